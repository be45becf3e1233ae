"""Shared test setup: every test runs offline on CPU, with the Triton interpreter and the shared
GPT-2 tokenizer cache (the same settings .ci/run uses)."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO.parent / "shared" / "data" / "tiktoken_cache"))
sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data"
