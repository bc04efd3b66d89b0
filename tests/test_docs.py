"""The README keeps its promises: every setting documented, the two commands first."""
from pathlib import Path

from shared.config import describe

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme_table():
    missing = [env for env, _, _ in describe() if f"| `{env}` |" not in README]
    assert not missing, f"add to README's configuration table: {missing}"


def test_readme_opens_with_the_two_commands():
    head = README.split("---", 1)[0]
    assert "bash scripts/serve.sh" in head and "bash scripts/test.sh" in head
    for script in ("scripts/serve.sh", "scripts/test.sh", ".ci/run"):
        assert (Path(__file__).resolve().parent.parent / script).is_file()
