"""The worker (forwarder/gunicorn_worker.py) through a running gunicorn: gunicorn's own TLS
(`--certfile`) still serves streams."""

import subprocess

import requests



def test_gunicorns_own_tls_still_serves_streams(fake_backend, forwarder, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    backend = fake_backend(config={"tokens": 20})
    fwd = forwarder([backend.url], wait_healthy=1,
                    extra_args=["--certfile", str(cert), "--keyfile", str(key)])
    assert fwd.url.startswith("https://")
    body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with requests.Session() as http:
        http.trust_env = False
        response = http.post(fwd.url + "/v1/chat/completions", json=body, verify=str(cert))
    assert response.status_code == 200
    assert response.text.count("data: ") == 20 + 3  # role, 20 tokens, finish, [DONE]
    assert response.text.endswith("data: [DONE]\n\n")
