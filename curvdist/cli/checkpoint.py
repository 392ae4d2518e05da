"""Resumable runs: finished query results and in-flight Lanczos states in a checkpoint directory.

``<output>.ckpt/`` holds ``config.json`` (the resolved config the checkpoint belongs to), one JSON file per
finished query (``<coords>-<index>.json``) and, while an eigenvalue query runs, its Lanczos state
(``<coords>-<index>.lanczos.pt``, saved every ``backend.checkpoint_every`` steps). ``curvdist run --resume``
reuses finished queries and restarts an interrupted eigensolve from its saved state; seeds are fixed, so the
numbers equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..queries import Result
from ..queries.result import to_jsonable


class QueryCheckpoint:
    def __init__(self, directory: Path, config: dict[str, Any], resume: bool) -> None:
        self.dir = directory
        stamp = json.dumps(config, sort_keys=True)
        if resume:
            saved = self.dir / "config.json"
            if not saved.is_file():
                raise ConfigError(f"--resume: no checkpoint at {self.dir} (run without --resume first)")
            if saved.read_text() != stamp:
                raise ConfigError(f"--resume: the checkpoint at {self.dir} belongs to a different config")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "config.json").write_text(stamp)

    def lanczos_path(self, key: str) -> Path:
        return self.dir / f"{key}.lanczos.pt"

    def load(self, key: str) -> Result | None:
        path = self.dir / f"{key}.json"
        if not path.is_file():
            return None
        return Result(**json.loads(path.read_text()))

    def save(self, key: str, result: Result) -> None:
        tmp = self.dir / f"{key}.json.tmp"
        tmp.write_text(json.dumps(to_jsonable(result.to_dict())))
        tmp.replace(self.dir / f"{key}.json")
        self.lanczos_path(key).unlink(missing_ok=True)

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
