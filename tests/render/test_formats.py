"""Each format's exact bytes, and errors that name keys, never values."""

from __future__ import annotations

import pytest

from agent.config import TemplateConfig
from agent.render.formats import RenderError, render, scrub
from tests.render.conftest import make_secret

DB = '{"username": "app", "password": "p w$\\"`x", "port": 5432}'


def _cfg(**kw: object) -> TemplateConfig:
    return TemplateConfig.model_validate({"destination": "/dev/shm/x", "secret": "db", **kw})


def _render(value: str = DB, /, **kw: object) -> bytes | dict[str, bytes]:
    cfg = _cfg(**kw)
    text = kw.get("template")
    return render(
        cfg, {"db": make_secret("db", value)}, template_text=text if isinstance(text, str) else None
    )


def test_raw_is_the_value_or_one_key() -> None:
    assert _render() == DB.encode()
    assert _render(key="password") == b'p w$"`x'
    assert _render(key="port") == b"5432"


def test_json_pretty_prints_the_object() -> None:
    assert _render(format="json") == (
        b'{\n  "username": "app",\n  "password": "p w$\\"`x",\n  "port": 5432\n}\n'
    )


def test_dotenv_quotes_and_escapes_as_python_dotenv_reads_them() -> None:
    """Only backslash, double quote, newline and CR are escaped: python-dotenv keeps ``\\$``."""
    assert _render(format="dotenv") == (b'username="app"\npassword="p w$\\"`x"\nport="5432"\n')


def test_shell_single_quotes() -> None:
    assert _render(format="shell") == (b"username='app'\npassword='p w$\"`x'\nport='5432'\n")


def test_yaml_keeps_key_order() -> None:
    assert _render(format="yaml") == b'username: app\npassword: p w$"`x\nport: 5432\n'


def test_files_gives_one_file_per_key() -> None:
    assert _render(format="files") == {"username": b"app", "password": b'p w$"`x', "port": b"5432"}


def test_template_with_filters() -> None:
    text = (
        "user={{ secrets['db'].username }} pw={{ secret('db', 'password') | shell_quote }}"
        " b64={{ 'ab' | b64encode }} env={{ secrets['db'].password | env_quote }}\n"
        "{{ secrets['db'] | tojson }}|{{ {'a': 1} | toyaml }}"
    )
    out = _render(format="template", template=text, secret=None, secrets=["db"])
    assert out == (
        b'user=app pw=\'p w$"`x\' b64=YWI= env="p w$\\"`x"\n'
        b'{"username": "app", "password": "p w$\\"`x", "port": 5432}|a: 1\n'
    )


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"key": "pasword"}, "secret 'db' has no key 'pasword'"),
        ({"key": "pasword", "format": "json"}, "secret 'db' has no key 'pasword'"),
        (
            {
                "format": "template",
                "template": "{{ secrets['db'].pasword }}",
                "secret": None,
                "secrets": ["db"],
            },
            "template error: undefined name, key or attribute, line 1",
        ),
        (
            {"format": "template", "template": "{{ nope }}", "secret": None, "secrets": ["db"]},
            "template error: undefined name, key or attribute, line 1",
        ),
        (
            {
                "format": "template",
                "template": "{{ secret('other') }}",
                "secret": None,
                "secrets": ["db"],
            },
            "template uses a secret it does not list in 'secrets', line 1",
        ),
        (
            {
                "format": "template",
                "template": "x\n{{ secret('db', secrets['db'].password) }}",
                "secret": None,
                "secrets": ["db"],
            },
            "template asks secret 'db' for a key it does not have, line 2",
        ),
    ],
)
def test_errors_name_the_problem_never_the_value(kw: dict[str, object], message: str) -> None:
    with pytest.raises(RenderError) as info:
        _render(**kw)
    assert message in info.value.message
    assert "p w$" not in info.value.message


def test_dotenv_and_files_need_an_object_and_safe_names() -> None:
    with pytest.raises(RenderError, match="needs secret 'db' to be a JSON object"):
        _render("plain text", format="dotenv")
    with pytest.raises(RenderError, match="not a valid environment variable name"):
        _render('{"bad-name": "x"}', format="dotenv")
    with pytest.raises(RenderError, match="not a safe file name"):
        _render('{"../etc": "x"}', format="files")


def test_sandbox_blocks_attribute_escapes() -> None:
    with pytest.raises(RenderError):
        _render(
            format="template", template="{{ ''.__class__.__mro__ }}", secret=None, secrets=["db"]
        )


def test_a_key_of_a_non_object_secret_is_refused() -> None:
    with pytest.raises(RenderError, match="secret 'db' is not a JSON object, so it has no key 'k'"):
        _render("plain text", key="k")


def test_a_value_used_as_a_name_in_a_template_is_scrubbed_from_the_error() -> None:
    """Jinja quotes an undefined attribute's name; here that name is the password."""
    text = "{{ secrets['db'][secrets['db'].password] }}"
    with pytest.raises(RenderError) as info:
        _render(format="template", template=text, secret=None, secrets=["db"])
    assert "p w$" not in info.value.message
    assert info.value.message == (
        "template error: undefined name, key or attribute, line 1 (template over secrets 'db')"
    )


def test_a_slice_of_a_value_used_as_a_key_is_not_in_the_error() -> None:
    """Issue 12 finding 3: ``password[1:]`` as a key quoted 23 of 24 characters."""
    value = '{"password": "Xk7#mQ2$vL9@pR4&tY6*wZ1!"}'
    text = "{{ secrets['db'][secrets['db'].password[1:]] }}"
    with pytest.raises(RenderError) as info:
        _render(value, format="template", template=text, secret=None, secrets=["db"])
    message = info.value.message
    secret = "Xk7#mQ2$vL9@pR4&tY6*wZ1!"
    assert not any(secret[i : i + 4] in message for i in range(len(secret) - 3)), message
    assert "undefined name, key or attribute, line 1" in message


@pytest.mark.parametrize("fmt", ["dotenv", "shell", "files"])
def test_a_key_unfit_for_the_format_is_named_by_place_not_by_text(fmt: str) -> None:
    """JSON keys are part of the value: the error gives the key's place only."""
    with pytest.raises(RenderError) as info:
        _render('{"ok": "1", "s3cr3t/k3y-n4me=": "x"}', format=fmt)
    assert "key number 2 of its JSON object" in info.value.message
    assert "s3cr3t" not in info.value.message


def test_a_value_that_overlaps_the_wording_or_a_name_does_not_garble_the_error() -> None:
    """Values "app" and "...secrets..." once turned the error into
    ``template over se<redacted>s '<redacted>/q'``: the secret's name was lost."""
    value = '{"user": "app", "password": "nosecretshere!"}'
    text = "{{ secrets['app/q'][secrets['app/q'].password[1:]] }}"
    cfg = _cfg(format="template", template=text, secret=None, secrets=["app/q"])
    with pytest.raises(RenderError) as info:
        render(cfg, {"app/q": make_secret("app/q", value)}, template_text=text)
    assert info.value.message == (
        "template error: undefined name, key or attribute, line 1 (template over secrets 'app/q')"
    )


def test_scrub_covers_every_fragment_of_4_or_more_and_short_values_standing_alone() -> None:
    assert scrub("got 'k7#mQ2' and 'abc' and 'zz'", ["Xk7#mQ2$", "abc", "zz"]) == (
        "got '<redacted>' and '<redacted>' and '<redacted>'"
    )
    assert scrub("line 3, secret 'app/q'", ["Xk7#mQ2$"]) == "line 3, secret 'app/q'"


def test_files_refuses_dot_names() -> None:
    for name in (".", "..", "..data", "a/b"):
        with pytest.raises(RenderError, match="not a safe file name"):
            _render(f'{{"{name}": "x"}}', format="files")
    assert _render('{".dockerconfigjson": "x"}', format="files") == {".dockerconfigjson": b"x"}


def test_binary_and_non_utf8_values() -> None:
    raw = b"\xff\x00bin"
    cfg = _cfg()
    assert render(cfg, {"db": make_secret("db", raw, binary=True)}) == raw
    assert render(cfg, {"db": make_secret("db", raw)}) == raw  # not UTF-8, stored as "string"
    json_cfg = _cfg(format="json")
    assert render(json_cfg, {"db": make_secret("db", raw, binary=True)}) == b'"/wBiaW4="\n'
    with pytest.raises(RenderError, match="needs secret 'db' to be a JSON object"):
        render(_cfg(format="yaml"), {"db": make_secret("db", raw)})
