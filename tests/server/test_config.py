import pytest

from server.config import ServerConfig, is_loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_loopback_binds_need_no_key(host):
    assert is_loopback(host)
    assert ServerConfig(host=host, api_key=None, admin_key=None).host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.internal"])
def test_non_loopback_binds_need_an_admin_key_or_an_explicit_opt_out(host):
    with pytest.raises(ValueError, match=f"refusing to listen on {host} without an admin key"):
        ServerConfig(host=host, api_key="user-only", admin_key=None)
    assert ServerConfig(host=host, admin_key="secret").admin_key == "secret"
    assert ServerConfig(host=host, admin_key=None, allow_insecure_no_auth=True).allow_insecure_no_auth
