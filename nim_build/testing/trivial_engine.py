"""A model-free engine with nim_build.runtime.LLMEngine's API, for benchmarking the serving path.

It "generates" by replaying each request's prompt ids cyclically (token k of the output is prompt[k % len]),
one token per request per step, with the same in-flight batching loop shape as the runtime: a background
thread admits waiting requests up to max_batch_size and emits one TokenEvent per active request per step.
With no model cost, what a benchmark measures is the Triton models around it (tokenization, detokenization,
response plumbing). Select it in a repository with the tensorrt_llm parameter
nim_build_engine = "nim_build.testing.trivial_engine:TrivialEngine". A `trivial_engine.json` file in the
engine directory ({"step_delay_s": 0.005}) makes every step last that long, like a model would.

`ScriptedEngine` (nim_build.testing.trivial_engine:ScriptedEngine) answers every request with the ids in the
engine directory's `script.json` at the time of the request, then the end id: what tests of output parsing (tool
calls) need from a model.
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time
from collections import deque
from pathlib import Path

from nim_build import TOKENS_PER_BLOCK
from nim_build.builder.manifest import load_manifest, write_manifest
from nim_build.errors import UserError
from nim_build.runtime.api import SamplingParams, TokenEvent


def write_engine_dir(
    out: Path,
    tokenizer_dir: Path,
    tokenizer: dict,
    vocab_size: int,
    *,
    max_batch_size: int = 64,
    max_seq_len: int = 4096,
) -> Path:
    """An engine directory this engine serves: a copy of the tokenizer folder and a manifest, no weights.
    `tokenizer` is the manifest's tokenizer section (kind, bos / end / pad ids, chat_template)."""
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    write_manifest(
        out,
        {
            "name": out.name,
            "backend": "reference",
            "spec": {"vocab_size": vocab_size},
            "build": {"max_batch_size": max_batch_size, "max_seq_len": max_seq_len, "world_size": 1},
            "tokenizer": {**tokenizer, "dir": "tokenizer"},
        },
    )
    return out


class _Seq:
    def __init__(self, rid, prompt, params, callback, script=None):
        self.rid, self.prompt, self.params, self.callback = rid, prompt, params, callback
        self.script = script  # the ids to generate (ScriptedEngine), else the prompt's, cyclically
        self.out: list[int] = []
        self.cancelled = False


class TrivialEngine:
    def __init__(
        self,
        *,
        max_seq_len: int,
        max_batch_size: int,
        end_id: int,
        pad_id: int,
        vocab_size: int,
        step_delay_s: float = 0.0,
    ):
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.end_id, self.pad_id, self.vocab_size = end_id, pad_id, vocab_size
        self.max_num_tokens = max_seq_len
        self.step_delay_s = step_delay_s
        self._ids = itertools.count(1)
        self._waiting: deque[_Seq] = deque()
        self._active: dict[int, _Seq] = {}
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._stats = {"steps": 0, "max_seqs_in_step": 0, "last_step_seqs": 0}

    @classmethod
    def from_engine_dir(
        cls,
        engine_dir,
        *,
        device="auto",
        max_batch_size=None,
        max_num_tokens=None,
        kv_cache_bytes=None,
        kv_cache_free_mem_fraction=None,
        enable_chunked_context=False,
        tokens_per_block=TOKENS_PER_BLOCK,
        step_delay_s: float = 0.0,
    ) -> TrivialEngine:
        """LLMEngine.from_engine_dir's signature; it has no KV cache, so the cache's settings change nothing."""
        m = load_manifest(Path(engine_dir))
        tok = m["tokenizer"]
        extra = Path(engine_dir) / "trivial_engine.json"
        if extra.is_file():
            step_delay_s = float(json.loads(extra.read_text()).get("step_delay_s", step_delay_s))
        return cls(
            max_seq_len=int(m["build"]["max_seq_len"]),
            max_batch_size=int(max_batch_size or m["build"]["max_batch_size"]),
            end_id=int(tok["end_id"]),
            pad_id=int(tok["pad_id"] if tok["pad_id"] is not None else tok["end_id"]),
            vocab_size=int(m["spec"]["vocab_size"]),
            step_delay_s=step_delay_s,
        )

    def start(self) -> None:
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="trivial-engine")
                self._thread.start()

    def submit(self, prompt_ids, params: SamplingParams, callback) -> int:
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise UserError("empty prompt")
        if params.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be positive, got {params.max_new_tokens}")
        if len(prompt) + params.max_new_tokens > self.max_seq_len:
            raise UserError(
                f"prompt ({len(prompt)}) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"max_seq_len ({self.max_seq_len})"
            )
        if any(not 0 <= i < self.vocab_size for i in prompt):
            raise UserError("token id out of range")
        seq = _Seq(next(self._ids), prompt, params, callback, self._script())
        with self._cv:
            self._waiting.append(seq)
            self._cv.notify()
        return seq.rid

    def _script(self) -> list[int] | None:
        return None

    def cancel(self, request_id: int) -> None:
        with self._cv:
            seq = self._active.get(request_id) or next((s for s in self._waiting if s.rid == request_id), None)
            if seq is not None:
                seq.cancelled = True
                self._cv.notify()

    def generate(self, prompt_ids, params: SamplingParams) -> list[int]:
        done = threading.Event()
        out: list[int] = []

        def cb(ev):
            out.extend(ev.token_ids)
            if ev.finished:
                done.set()

        self.start()
        self.submit(prompt_ids, params, cb)
        done.wait()
        return out

    def stats(self) -> dict:
        with self._cv:
            return {
                **self._stats,
                "active": len(self._active),
                "waiting": len(self._waiting),
                "free_blocks": 0,
                "total_blocks": 0,
            }

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._active and not self._waiting:
                    self._cv.wait()
                if self._stop:
                    return
                while self._waiting and len(self._active) < self.max_batch_size:
                    seq = self._waiting.popleft()
                    self._active[seq.rid] = seq
                batch = list(self._active.values())
                self._stats["steps"] += 1
                self._stats["last_step_seqs"] = len(batch)
                self._stats["max_seqs_in_step"] = max(self._stats["max_seqs_in_step"], len(batch))
            for seq in batch:
                ev = self._advance(seq)
                if ev.finished:
                    with self._cv:
                        self._active.pop(seq.rid, None)
                seq.callback(ev)
            if self.step_delay_s:
                time.sleep(self.step_delay_s)

    def _advance(self, seq: _Seq) -> TokenEvent:
        if seq.cancelled:
            return TokenEvent(seq.rid, [], True, "cancelled")
        if seq.script is not None:
            token = seq.script[len(seq.out)] if len(seq.out) < len(seq.script) else self.end_id
        else:
            token = seq.prompt[len(seq.out) % len(seq.prompt)]
        end_id = self.end_id if seq.params.end_id is None else seq.params.end_id
        if token == end_id:
            return TokenEvent(seq.rid, [], True, "end_id")
        seq.out.append(token)
        for word in seq.params.stop_words:
            if word and seq.out[-len(word) :] == word:
                return TokenEvent(seq.rid, [token], True, "stop")  # the stop sequence is output, as upstream
        if len(seq.out) >= seq.params.max_new_tokens:
            return TokenEvent(seq.rid, [token], True, "length")
        return TokenEvent(seq.rid, [token], False, None)


ENGINE_CLASS = f"{__name__}:{TrivialEngine.__name__}"  # RepoOptions.engine_class of a repository serving it


class ScriptedEngine(TrivialEngine):
    """Generates the ids of ENGINE_DIR/script.json (read at each submit), then the end id; writes each request's
    prompt ids to ENGINE_DIR/last_prompt.json (what tests of prompt rendering read)."""

    SCRIPT = "script.json"
    LAST_PROMPT = "last_prompt.json"

    @classmethod
    def from_engine_dir(cls, engine_dir, **kwargs) -> ScriptedEngine:
        engine = super().from_engine_dir(engine_dir, **kwargs)
        engine.script_path = Path(engine_dir) / cls.SCRIPT
        return engine

    def submit(self, prompt_ids, params: SamplingParams, callback) -> int:
        (self.script_path.parent / self.LAST_PROMPT).write_text(json.dumps([int(i) for i in prompt_ids]))
        return super().submit(prompt_ids, params, callback)

    def _script(self) -> list[int]:
        return [int(i) for i in json.loads(self.script_path.read_text())]
