"""Property-based tests (hypothesis) for what parses outside input: the `ip.txt` parser, the
settings, and the path check of the proxy. No input makes them raise anything but the intended
error, and no path they let through reaches a backend outside `/v1/`."""

import json
import posixpath
import string
import urllib.parse

import pytest
from hypothesis import example, given, settings as hypothesis_settings, strategies as st

from forwarder import settings
from forwarder.fleet import backend_list
from forwarder.relay.proxy import upstream_target
from forwarder.relay.json_bodies import encoded, json_object

# Text that looks like what an operator or an attacker would type, plus anything at all.
ENTRY_PIECES = st.sampled_from([
    "http://", "https://", "ftp://", "dns+", "[", "]", ":", "::", "/", "/v1", "/v1/", "?", "#",
    "@", "%", "%2f", "10.0.0.1", "fd00::5", "fe80::1%eth0", "my-gpu", "host.example.", "_svc",
    "-", ".", "8101", "0", "65535", "65536", "99999999999", "-1", "+1", "\u0663", "\u00e9", " ",
    "\t", "\x00", "\x80", "user:pw", "localhost", "dns+", "DNS+",
])
MESSY_TEXT = st.one_of(st.text(), st.lists(ENTRY_PIECES, max_size=8).map("".join))


@given(MESSY_TEXT, st.integers(min_value=1, max_value=65535))
@example("http://[::1", 8101)
@example("http://h:\u0663", 8101)
@example("h:+1", 8101)
@example("http://h/v1/v1", 8101)
@example("HTTP://0/\x80", 1)
@example("dns+my-svc:9001", 8101)
def test_an_ip_entry_gives_a_base_url_or_value_error(entry, default_port):
    try:
        url = backend_list.parse_entry(entry, default_port)
    except ValueError:
        return
    if isinstance(url, backend_list.DnsName):
        assert 1 <= url.port <= 65535 and url.name.isascii()
        assert backend_list.parse_entry(url.source, default_port) == url
        return
    split = urllib.parse.urlsplit(url)
    assert split.scheme in ("http", "https")
    assert split.hostname
    assert split.port is None or 1 <= split.port <= 65535
    assert not (split.query or split.fragment or split.username or split.password)
    assert not any(c.isspace() for c in url)
    assert url.isascii()
    # A base URL is itself a valid entry.
    backend_list.parse_entry(url, default_port)


@given(st.lists(st.one_of(MESSY_TEXT, st.just("# comment"), st.just("")), max_size=10)
       .map("\n".join))
def test_a_backend_list_never_raises(text):
    urls = backend_list.parse_backend_list(text, "ip.txt", 8101)
    assert len(urls) == len(set(urls))
    for url in urls:  # each is itself a valid entry
        entry = url.source if isinstance(url, backend_list.DnsName) else url
        backend_list.parse_entry(entry, 8101)


NUMBERISH = st.sampled_from(["0", "1", "-1", "0.5", "1e3", "1e400", "nan", "inf", "-inf",
                             "1_000", "0x10", "\u0663", "65536", " 10 ", "", "abc", "1,5"])
KEYISH = st.sampled_from(["sk-1", "a,b", "a,,b", ",", " , ", "k\u00e9y", "key with space",
                          "tok==", "=tok", "a/b+c~d._-", "\x00", ""])
SETTING_VALUES = st.one_of(st.text(max_size=20), NUMBERISH, KEYISH)


@pytest.fixture(scope="module")
def ip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ip") / "ip.txt"
    path.write_text("127.0.0.1:8101\n")
    return str(path)


@hypothesis_settings(max_examples=300)
@given(st.dictionaries(st.sampled_from([s.name for s in settings.SETTINGS
                                        if s.name != "IP_LIST_FILE"]), SETTING_VALUES),
       st.one_of(st.none(), st.sampled_from(["", "/nonexistent/ip.txt", "/", "\x00"])))
def test_settings_load_or_name_the_bad_one_in_one_line(ip_file, environ, bad_file):
    environ = {**environ, "IP_LIST_FILE": ip_file if bad_file is None else bad_file}
    try:
        settings.load(environ)
    except settings.SettingError as error:
        message = str(error)
        name = message.split("=", 1)[0]
        assert name in environ
        assert "\n" not in message
        # A secret's value is never shown, any other value is, as it was set.
        secret = next(s for s in settings.SETTINGS if s.name == name).secret
        shown = "<hidden>" if secret else repr(environ[name])
        assert message.startswith(f"{name}={shown}: ")


# Pieces of request paths that decode, normalise or split into something else.
PATH_PIECES = st.sampled_from([
    "/", "//", ".", "..", "%2e", "%2E", "%2e%2e", "%2f", "%2F", "%5c", "%5C", "\\", "%25",
    "%252e", "%252f", "%", "%0", "%00", "\x00", ";", "?", "#", "v1", "V1", "a", "metrics",
    "_fake", "%76%31", "@", "http:", "%3f", "%23", "\u00e9", "%c0%ae", "%ff", " ",
])
RAW_PATHS = st.one_of(
    st.lists(PATH_PIECES, max_size=12).map(lambda pieces: "/v1/" + "".join(pieces)),
    st.lists(PATH_PIECES, max_size=12).map("".join),
)
BACKEND = "http://127.0.0.1:8101"


def _fully_decoded(path: str) -> str:
    for _ in range(10):
        decoded = urllib.parse.unquote(path)
        if decoded == path:
            break
        path = decoded
    return path


@hypothesis_settings(max_examples=300)
@given(RAW_PATHS)
@example("/v1/%252e%252e/metrics")
@example("/v1/..%255cmetrics")
@example("/v1/%2e%2e%2fmetrics")
@example("%2f%76%31/%25")  # no leading slash: appended to the base URL it would change the host
@example("@evil.example/v1/x")
def test_no_path_let_through_reaches_a_backend_outside_v1(raw):
    target = upstream_target(raw)
    if target is None:
        return
    # What upstream.send puts on the wire for it, to the backend from ip.txt and no other host,
    # stays under /v1/ however many times the backend (or anything before it) decodes it.
    sent = urllib.parse.urlsplit(BACKEND + target)
    assert f"{sent.scheme}://{sent.netloc}" == BACKEND
    path = _fully_decoded(sent.path)
    assert "\\" not in path and "\x00" not in path
    assert posixpath.normpath(path).startswith("/v1/")


@given(st.text(alphabet=string.ascii_letters + string.digits + "-._~/", min_size=1))
def test_plain_paths_under_v1_pass_unchanged(rest):
    raw = "/v1/" + rest
    expected = raw if posixpath.normpath(raw).startswith("/v1/") else None
    assert upstream_target(raw) == expected
    assert upstream_target(raw + "?a=%2F..%2F") == (expected and expected + "?a=%2F..%2F")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20)


@given(st.one_of(st.binary(), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                 st.builds(lambda v: b"{" + v, st.binary())))
@example(b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}")
@example(b'{"content": "\\ud800"}')
def test_forcing_the_model_never_raises_and_only_sets_model(body):
    # What the proxy does with FORCED_MODEL_NAME: parse, and rewrite only a JSON object.
    parsed = json_object(body)
    if parsed is None:
        return
    rewritten = encoded(parsed, "forced")
    original, document = json.loads(body), json.loads(rewritten)
    assert document.pop("model") == "forced"
    original.pop("model", None)
    assert json.dumps(document, sort_keys=True) == json.dumps(original, sort_keys=True)
