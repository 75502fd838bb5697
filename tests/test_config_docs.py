"""docs/configuration.md, cli.md and observability.md are generated from the code."""

from __future__ import annotations

from agent import cli_docs, config_docs, metrics_docs


def test_every_config_field_has_a_description() -> None:
    problems = config_docs.problems()
    assert not problems, (
        "config fields without a description (add one with Field(description=...) in "
        "agent/config.py or in DESCRIPTIONS in agent/config_descriptions.py):\n"
        + "\n".join(problems)
    )


def test_the_committed_reference_is_current() -> None:
    text = config_docs.DOC.read_text(encoding="utf-8")
    assert config_docs.updated(text) == text, (
        "docs/configuration.md is stale: the config model changed. Regenerate it with\n"
        f"    .venv/bin/{config_docs.REGENERATE}\n"
        "and commit the result."
    )


def test_the_reference_names_types_and_defaults_from_the_model() -> None:
    ref = config_docs.reference()
    assert "| `refresh.max_stale` | duration | `1d` |" in ref
    assert '| `templates[].mode` | mode ("0400") | `"0400"` |' in ref
    assert "| `store.bucket` (s3) | string | required |" in ref
    assert "| `datakeys.cache_capacity` | integer > 0 | `1024` |" in ref


def test_the_committed_cli_reference_is_current() -> None:
    assert cli_docs.DOC.read_text(encoding="utf-8") == cli_docs.reference(), (
        "docs/cli.md is stale: a command or flag changed. Regenerate it with\n"
        f"    .venv/bin/{cli_docs.REGENERATE}\n"
        "and commit the result."
    )


def test_the_committed_metrics_reference_is_current() -> None:
    """docs/observability.md (which the alert rules point at) lists every metric as defined."""
    text = metrics_docs.DOC.read_text(encoding="utf-8")
    assert text == metrics_docs.reference(), (
        "docs/observability.md is stale: a metric changed. Regenerate it with\n"
        f"    .venv/bin/{metrics_docs.REGENERATE}\n"
        "and commit the result."
    )
    assert "| `secrets_agent_cache_stale_age_seconds` | gauge | - |" in text
    assert "| `secrets_agent_renders_total` | counter | `template`, `outcome` |" in text
