"""Unit tests for settings: defaults, validation, and the README table kept in step."""

import typing
from pathlib import Path

import pytest

from forwarder import settings


@pytest.fixture
def ip_file(tmp_path):
    path = tmp_path / "ip.txt"
    path.write_text("127.0.0.1:8101\n")
    return str(path)


def test_defaults(ip_file):
    loaded = settings.load({"IP_LIST_FILE": ip_file})
    assert loaded.check_interval_seconds == 10
    assert loaded.backend_default_port == 8101
    assert loaded.forced_model_name is None
    assert loaded.health_timeout_seconds == 5
    assert loaded.connect_timeout_seconds == 5
    assert loaded.read_timeout_seconds == 600
    assert loaded.dns_server is None
    assert loaded.dns_timeout_seconds == 5


@pytest.mark.parametrize("name, value", [
    ("CHECK_INTERVAL_SECONDS", "abc"),
    ("CHECK_INTERVAL_SECONDS", "0"),
    ("CHECK_INTERVAL_SECONDS", "-1"),
    ("CHECK_INTERVAL_SECONDS", "nan"),
    ("BACKEND_DEFAULT_PORT", "70000"),
    ("BACKEND_DEFAULT_PORT", "80.5"),
    ("READ_TIMEOUT_SECONDS", "inf"),
    ("IP_LIST_FILE", "/nonexistent/ip.txt"),
    ("DNS_SERVER", "kube-dns"),
    ("DNS_SERVER", "10.96.0.10:0"),
    ("DNS_SERVER", "10.96.0.10:53/udp"),
    ("DNS_TIMEOUT_SECONDS", "0"),
])
def test_bad_values_name_the_setting_in_one_line(ip_file, name, value):
    env = {"IP_LIST_FILE": ip_file, name: value}
    with pytest.raises(settings.SettingError) as info:
        settings.load(env)
    message = str(info.value)
    assert message.startswith(f"{name}={value!r}")
    assert "\n" not in message


@pytest.mark.parametrize("value", ["0", "-1", "-0.5"])
def test_a_positive_setting_says_zero_is_refused_too(ip_file, value):
    with pytest.raises(settings.SettingError) as info:
        settings.load({"IP_LIST_FILE": ip_file, "CHECK_INTERVAL_SECONDS": value})
    assert str(info.value) == (f"CHECK_INTERVAL_SECONDS={value!r}: must be a finite number of "
                               f"seconds, more than 0")


def test_every_setting_has_a_real_type():
    hints = typing.get_type_hints(settings.Settings)
    assert len(hints) == len(settings.SETTINGS)
    assert all(hint is not typing.Any for hint in hints.values())
    loaded = settings.load({"IP_LIST_FILE": __file__})
    assert isinstance(loaded.check_interval_seconds, float)
    assert isinstance(loaded.backend_default_port, int)


@pytest.mark.parametrize("value, server", [
    ("", None), ("10.96.0.10", ("10.96.0.10", 53)), ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("fd00::a", ("fd00::a", 53)), ("[fd00::a]:5353", ("fd00::a", 5353)),
])
def test_dns_server(ip_file, value, server):
    assert settings.load({"IP_LIST_FILE": ip_file, "DNS_SERVER": value}).dns_server == server


def test_fractional_interval(ip_file):
    assert settings.load({"IP_LIST_FILE": ip_file,
                          "CHECK_INTERVAL_SECONDS": "0.5"}).check_interval_seconds == 0.5


def test_readme_lists_every_setting_with_its_default():
    # Regenerate with: python -c "from forwarder import settings; print(settings.markdown_table())"
    readme = (Path(__file__).resolve().parent.parent.parent / "README.md").read_text()
    assert settings.markdown_table() in readme, "the README's settings table is out of date"
