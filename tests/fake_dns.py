"""A fake DNS server for tests: answers A and AAAA questions over UDP from a zone file it re-reads
for every question, so a test changes the answers between two polls by rewriting the file.

    python -m tests.fake_dns --zone ZONE.json [--host 127.0.0.1] [--port 0]

The zone file is JSON: `{"mode": "answer", "records": {"vllm.test": {"A": ["127.0.0.2"],
"AAAA": ["::1"]}}}`. A name it lists answers its records of the asked type (none: an empty
answer); a name it does not list is NXDOMAIN. `"mode": "servfail"` answers SERVFAIL to
everything, `"mode": "hang"` never answers. Every question is logged as one line
`question NAME TYPE MODE`, which `tests.harness.FakeDns` reads.
"""

import argparse
import json
import socket

import dns.exception
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

TTL = 1


def answer(query: dns.message.Message, zone: dict) -> "dns.message.Message | None":
    """The response to `query` under `zone`; None to stay silent."""
    mode = zone.get("mode", "answer")
    if mode == "hang":
        return None
    response = dns.message.make_response(query)
    if mode == "servfail":
        response.set_rcode(dns.rcode.SERVFAIL)
        return response
    records = {name.lower().rstrip("."): types for name, types in zone["records"].items()}
    for question in query.question:
        name = question.name.to_text(omit_final_dot=True).lower()
        if name not in records:
            response.set_rcode(dns.rcode.NXDOMAIN)
            continue
        addresses = records[name].get(dns.rdatatype.to_text(question.rdtype), [])
        if addresses:
            response.answer.append(dns.rrset.from_text_list(
                question.name, TTL, dns.rdataclass.IN, question.rdtype, addresses))
    return response


def serve(sock: socket.socket, zone_path: str) -> None:
    while True:
        wire, client = sock.recvfrom(65535)
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            continue
        with open(zone_path, encoding="utf-8") as f:
            zone = json.load(f)
        for question in query.question:
            print(f"question {question.name} {dns.rdatatype.to_text(question.rdtype)} "
                  f"{zone.get('mode', 'answer')}", flush=True)
        response = answer(query, zone)
        if response is not None:
            sock.sendto(response.to_wire(), client)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--zone", required=True, help="the zone file, JSON")
    args = parser.parse_args()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((args.host, args.port))
        host, port = sock.getsockname()[:2]
        print(f"fake dns listening on {host}:{port}", flush=True)
        try:
            serve(sock, args.zone)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
