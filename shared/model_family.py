"""Which Moondream family a model source holds, read without loading it, and the name a
server reports for it.  The front end, which never loads the model, uses this to answer
to the right name: `moondream3-preview` is Moondream 3 when one is served, and an alias
of Moondream 2 only while none is (the official client's chat() asks for it by default)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

MOONDREAM2, MOONDREAM3 = "moondream2", "moondream3"
MOONDREAM3_HUB_REPO = "moondream/moondream3-preview"
# The id a response's `model` carries, and other names accepted for it, per family.
MODEL_IDS = {MOONDREAM2: "moondream2", MOONDREAM3: "moondream3-preview"}
DEFAULT_ALIASES = {MOONDREAM2: ("moondream3-preview", "vikhyatk/moondream2"), MOONDREAM3: (MOONDREAM3_HUB_REPO,)}


def family_of(source: str) -> str:
    """MOONDREAM_MODEL's value -> "moondream2" or "moondream3": the hub id, random:md3-*,
    or a local directory whose config.json says "model": "moondream3" (or has text.moe)."""
    if source == MOONDREAM3_HUB_REPO or source.startswith("random:md3"):
        return MOONDREAM3
    try:
        with open(os.path.join(source, "config.json")) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return MOONDREAM2
    inner = raw.get("config", raw) if isinstance(raw, dict) else {}
    text = inner.get("text", {}) if isinstance(inner, dict) else {}
    moondream3 = raw.get("model") == MOONDREAM3 or (isinstance(text, dict) and "moe" in text)
    return MOONDREAM3 if moondream3 else MOONDREAM2


# ------------------------------------------------------------------ several models (MOONDREAM_MODELS)
@dataclass(frozen=True)
class ServedModel:
    id: str  # what requests' `model` names and responses report
    source: str  # MOONDREAM_MODEL's form: hub id, directory, random:...
    family: str


def served_models(config) -> list[ServedModel]:
    """The models this deployment serves, the default first: MOONDREAM_MODELS's entries, or
    MOONDREAM_MODEL alone (named MODEL_NAME, or its family's id).  Raises ValueError for a
    malformed MOONDREAM_MODELS (one line)."""
    if not config.models.strip():
        family = family_of(config.model)
        return [ServedModel(config.model_name or MODEL_IDS[family], config.model, family)]
    out = []
    for entry in (e.strip() for e in config.models.split(",")):
        if not entry:
            continue
        model_id, eq, source = entry.partition("=")
        if not eq:  # a bare source: its family's id
            source, model_id = entry, ""
        source, model_id = source.strip(), model_id.strip()
        if not source:
            raise ValueError(f"MOONDREAM_MODELS entry {entry!r} names no source")
        family = family_of(source)
        out.append(ServedModel(model_id or MODEL_IDS[family], source, family))
    ids = [m.id for m in out]
    if not out or len(set(ids)) != len(ids):
        raise ValueError(f"MOONDREAM_MODELS={config.models!r}: give one or more entries with distinct ids "
                         "(`id=<source>`; two of one family need their own ids)")
    return out


def config_for_worker(config):
    """A GPU worker's config: MOONDREAM_MODELS's entry MOONDREAM_MODEL_INDEX as its model."""
    models = served_models(config)
    if not 0 <= config.model_index < len(models):
        raise ValueError(f"MOONDREAM_MODEL_INDEX={config.model_index} but MOONDREAM_MODELS has {len(models)} entries")
    chosen = models[config.model_index]
    return dataclasses.replace(config, model=chosen.source, model_name=chosen.id)


_PROGRAM = """[program:gpu_worker_{index}]
; MOONDREAM_MODELS entry {index}: {model_id} ({source})
command={python} -m gpu_worker
directory={repo}
environment=MOONDREAM_MODEL_INDEX="{index}"
priority=20
startsecs=5
startretries=3
autorestart=unexpected
exitcodes=78
stopwaitsecs=10
stopasgroup=true
killasgroup=true
stdout_logfile=%(ENV_RUN_DIR)s/gpu_worker_{index}.log
redirect_stderr=true
"""


def write_worker_programs(config, directory: str, python: str = sys.executable) -> list[str]:
    """supervisord programs for the GPU workers of MOONDREAM_MODELS's entries after the first
    (supervisord.conf's own `gpu_worker` serves entry 0), one file each in `directory`, which
    supervisord.conf includes; stale files of an earlier start are removed.  Returns the paths."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.startswith("gpu_worker_") and name.endswith(".conf"):
            os.remove(os.path.join(directory, name))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = []
    for index, model in enumerate(served_models(config)[1:], start=1):
        path = os.path.join(directory, f"gpu_worker_{index}.conf")
        with open(path, "w") as f:
            f.write(_PROGRAM.format(index=index, model_id=model.id, source=model.source, python=python, repo=repo))
        paths.append(path)
    return paths


def main(argv=None) -> int:
    """`python -m shared.model_family <dir>`: write the extra GPU worker programs (serve.sh, Dockerfile)."""
    from shared.config import load_config

    args = sys.argv[1:] if argv is None else argv
    try:
        write_worker_programs(load_config(), args[0] if args else os.path.join(os.environ["RUN_DIR"], "gpu_workers"))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 78
    return 0


if __name__ == "__main__":
    sys.exit(main())
