"""Human preferences: sample several replies per prompt, let a person rank them, keep the pairs.

The comparison data of RLHF (Ouyang et al. 2022, "Training language models to follow
instructions with human feedback", sec. 3.5) is collected this way: a labeller sees K
replies to one prompt, ranks them, and every one of the K(K-1)/2 pairs the ranking implies
becomes a training comparison. ``lmlab rank`` does the same in a terminal::

    [1/300] What is 4 * 5? Answer with the number only.
      1) 20
      2) 21
      3) 20.
    rank best first (e.g. "2 1 3"), s = skip, q = quit: 1 3 2

    -> pairs (20 > 20.), (20 > 21), (20. > 21), each a line of prefs.jsonl

Choices made here:

- **Prompts file.** A ``.jsonl`` file (or a folder of them) holds one object a line, either
  ``{"prompt": "..."}`` or an instruction-task row (``instruction``, optional ``input`` and
  ``system``, as ``lmlab.data.tasks`` writes them; ``output`` is optional and, with
  ``task``, is kept in each pair's meta as ``reference`` so a programmatic judge can grade
  the pair later). Any other file is plain text, one prompt a line (blank lines ignored).
  Errors name ``file:line`` (``lmlab.data.instructions.read_rows``).
- **Prompt ids.** A row's ``id`` when it has one, else the first 12 hex digits of the
  SHA-256 of the prompt's messages: stable when the file is reordered or extended.
- **Sampling.** The K replies of a prompt are one batch of K copies of the prompt, decoded
  with one generator seeded with ``prompt_seed(seed, prompt_id)``; every row draws its own
  tokens, so the replies differ, and the same seed replays them exactly. Prompts are
  rendered with the model's chat template (``template_for``: the plain Alpaca layout when
  it has none), and decoding stops at the template's end-of-turn token.
- **Pairs.** Every ordered pair implied by the ranking (InstructGPT's K choose 2), chosen =
  the better-ranked reply. Identical replies are pointed out to the person, who still ranks
  them; a pair of identical texts teaches nothing and is not written, and two texts are
  compared once (by their best ranks).
- **Resuming.** A journal ``<out>.session.json`` (rewritten atomically after each
  decision) records every ranked or skipped prompt with its replies and ranking. A decision
  goes to the journal first, then its pairs to ``<out>`` through ``PreferenceLog`` (each
  line fsynced), so a crash at any point loses nothing: on restart, pairs missing from the
  log for a journalled ranking are written, and no ranked or skipped prompt is asked again.

The session is driven by an ``ask`` function (default ``input``) and a ``show`` function
(default ``print``), so tests script the person's answers. Tests:
``tests/align/test_rank.py`` (a tiny random model, scripted answers, crash and resume).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmlab.data.chat import check_messages
from lmlab.data.instructions import example_from_row, read_rows, template_for
from lmlab.data.preferences import PreferenceLog, PreferencePair
from lmlab.errors import ConfigError, DataError, DataNotFoundError
from lmlab.fileio import atomic_write_json
from lmlab.generate import SamplingParams, generate_text
from lmlab.lm import LM, load

EXPECTED_PROMPTS = (
    "expected 'prompt' (a string) or 'instruction' (with optional 'input' and 'system')"
)
SESSION_SUFFIX = ".session.json"


# ----------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptItem:
    """One prompt to answer: the conversation so far (ending with the user's message)."""

    prompt_id: str
    messages: tuple[dict[str, str], ...]
    """[system?] user: what the model reads, through its chat template."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Carried into every pair: ``task`` and ``reference`` for a task row, else nothing."""

    @property
    def text(self) -> str:
        """The user's message (what a person reads as the prompt)."""
        return self.messages[-1]["content"]


def prompt_id_of(messages: Sequence[Mapping[str, str]]) -> str:
    """A short stable id: the first 12 hex digits of SHA-256 of the messages as JSON."""
    data = json.dumps([dict(m) for m in messages], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:12]


def item_from_row(row: Mapping[str, Any], where: str = "row") -> PromptItem:
    """A ``PromptItem`` from a ``{"prompt"}`` or instruction-task row (errors name ``where``).

    ``{"task": "arithmetic", "instruction": "What is 4 * 5?", "input": "", "output": "20"}``
        -> messages [user "What is 4 * 5?"], meta {"task": "arithmetic", "reference": "20"}
    """
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string, got {row['prompt']!r}")
        messages = [{"role": "user", "content": row["prompt"]}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": row["system"]})
    elif "instruction" in row:
        # The instruction-data rule for turning instruction + input into a user turn;
        # the reply is a placeholder, dropped below.
        example = example_from_row({**row, "output": str(row.get("output", ""))}, where)
        messages = [dict(m) for m in example.messages[:-1]]
    else:
        raise DataError(f"{where}: {EXPECTED_PROMPTS}; the line has keys {sorted(row)}")
    meta: dict[str, Any] = {}
    if "task" in row and "output" in row:
        meta = {"task": row["task"], "reference": row["output"]}
    if "id" in row:
        if not isinstance(row["id"], str | int) or isinstance(row["id"], bool):
            raise DataError(f"{where}: 'id' must be a string or an integer, got {row['id']!r}")
        prompt_id = str(row["id"])
    else:
        prompt_id = prompt_id_of(messages)
    return PromptItem(prompt_id, tuple(check_messages(messages)), meta)


def read_prompts(path: str | os.PathLike) -> list[PromptItem]:
    """The prompts of a ``.jsonl`` file or folder (see ``item_from_row``), or of a plain text
    file with one prompt a line (blank lines ignored). Repeated prompts are kept once.

    Raises ``DataNotFoundError`` for a missing path and ``DataError`` (naming ``file:line``)
    for an empty file or a malformed line.
    """
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"prompts {str(path)!r} does not exist")
    if path.is_dir() or path.suffix == ".jsonl":
        items = [
            item_from_row(row, where) for where, row in read_rows(path, "prompts", EXPECTED_PROMPTS)
        ]
    else:
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
        items = [item_from_row({"prompt": line.strip()}) for line in lines if line.strip()]
        if not items:
            raise DataError(f"{path}: the file has no prompts; expected one prompt a line")
    unique: dict[str, PromptItem] = {}
    for item in items:
        unique.setdefault(item.prompt_id, item)
    return list(unique.values())


# ----------------------------------------------------------------------------- sampling


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The sampling seed of one prompt: depends only on ``seed`` and the prompt's id, so a
    resumed session or a reordered file samples the same replies."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def reply_params(lm: LM, params: SamplingParams) -> SamplingParams:
    """``params`` plus the stop ids of a chat turn: the tokenizer's ``eos_id`` and the
    template's end-of-turn token when it is one token (``<|im_end|>`` for ChatML)."""
    template = template_for(lm.tokenizer, lm.chat_template)
    eos = params.eos_id if params.eos_id is not None else getattr(lm.tokenizer, "eos_id", None)
    stop_ids = list(params.stop_ids)
    if template.eos_token:
        ids = lm.tokenizer.encode(template.eos_token)
        if len(ids) == 1 and ids[0] != eos:
            stop_ids.append(ids[0])
    return dataclasses.replace(params, eos_id=eos, stop_ids=tuple(dict.fromkeys(stop_ids)))


def render_prompt(lm: LM, messages: Sequence[Mapping[str, str]]) -> str:
    """The text the model reads: ``messages`` through its chat template, ready to reply."""
    template = template_for(lm.tokenizer, lm.chat_template)
    return template.render([dict(m) for m in messages], add_generation_prompt=True)


def sample_replies(
    lm: LM, messages: Sequence[Mapping[str, str]], n: int, params: SamplingParams
) -> list[str]:
    """``n`` replies of ``lm`` to the conversation ``messages``: one batch of ``n`` copies
    of the rendered prompt, each row sampling its own tokens from ``params.seed``'s
    generator (surrounding whitespace stripped)."""
    text = render_prompt(lm, messages)
    replies = generate_text(lm.model, lm.tokenizer, [text] * n, reply_params(lm, params))
    return [reply.strip() for reply in replies]


# ----------------------------------------------------------------------------- rankings


def parse_ranking(answer: str, n: int) -> tuple[int, ...] | str:
    """A person's answer -> the replies' 0-based indices best first, ``"skip"`` or ``"quit"``.

    ``"2 1 3"`` (or ``"2,1,3"``, or ``"213"`` when n < 10) -> (1, 0, 2). Raises
    ``ValueError`` with a message saying what is valid.
    """
    text = answer.strip().lower()
    if text in ("s", "skip"):
        return "skip"
    if text in ("q", "quit", "exit"):
        return "quit"
    parts = text.replace(",", " ").split()
    if len(parts) == 1 and n < 10 and parts[0].isdigit() and len(parts[0]) == n:
        parts = list(parts[0])
    valid = (
        f"give all {n} reply numbers 1..{n} once each, best first "
        f"(e.g. {' '.join(str(i) for i in range(n, 0, -1))}), or s to skip, q to quit"
    )
    if not all(p.isdigit() for p in parts) or sorted(int(p) for p in parts) != list(
        range(1, n + 1)
    ):
        raise ValueError(f"{answer.strip()!r} is not a ranking: {valid}")
    return tuple(int(p) - 1 for p in parts)


def pairs_from_ranking(
    item: PromptItem, replies: Sequence[str], order: Sequence[int], meta: Mapping[str, Any]
) -> list[PreferencePair]:
    """Every pair the ranking implies (``order``: reply indices best first), better first.

    replies ["a", "b", "c"], order (1, 0, 2) -> (b > a), (b > c), (a > c). A pair of two
    identical texts is left out, and so is a pair of texts already paired (identical
    replies ranked apart: the first, better-ranked comparison counts). Each pair's meta: ``meta``, the item's meta, ``prompt_id``,
    ``ranks`` (the rank of each reply, 1 = best) and the two replies' ranks.
    """
    ranks = [0] * len(replies)
    for rank, index in enumerate(order, start=1):
        ranks[index] = rank
    prompt = item.text if len(item.messages) == 1 else item.messages
    pairs, seen = [], set()
    for i, better in enumerate(order):
        for worse in order[i + 1 :]:
            texts = frozenset((replies[better], replies[worse]))
            if len(texts) == 1 or texts in seen:
                continue
            seen.add(texts)
            pair_meta = {
                **meta,
                **item.meta,
                "prompt_id": item.prompt_id,
                "ranks": ranks,
                "chosen_rank": ranks[better],
                "rejected_rank": ranks[worse],
            }
            pairs.append(PreferencePair(prompt, replies[better], replies[worse], pair_meta))
    return pairs


def duplicates(replies: Sequence[str]) -> list[list[int]]:
    """Groups of identical replies (1-based numbers): ["a", "b", "a"] -> [[1, 3]]."""
    groups: dict[str, list[int]] = {}
    for i, reply in enumerate(replies, start=1):
        groups.setdefault(reply, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


# ----------------------------------------------------------------------------- session


@dataclass(frozen=True)
class RankSummary:
    """What a session did: prompts ranked and skipped now, pairs written, prompts left."""

    ranked: int
    skipped: int
    pairs: int
    remaining: int
    """Prompts of the file still to rank (0 when the file is done)."""
    quit: bool
    """Whether the person quit (or input ended) before the last prompt."""
    out: Path


class RankingSession:
    """Rank ``lm``'s replies to ``items`` interactively, writing pairs to ``out``.

    ``ask(question) -> answer`` reads the person's answer (``input``; ``EOFError`` quits)
    and ``show(text)`` writes to the terminal (``print``). Reopening the same ``out`` skips
    every prompt already ranked or skipped (see the module doc).
    """

    def __init__(
        self,
        lm: LM,
        items: Sequence[PromptItem],
        out: str | os.PathLike,
        samples: int = 4,
        seed: int = 0,
        params: SamplingParams | None = None,
        ask: Callable[[str], str] = input,
        show: Callable[[str], None] = print,
    ):
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
            raise ConfigError(f"samples={samples!r} is invalid: must be an integer >= 2")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed={seed!r} is invalid: must be an integer >= 0")
        self.lm, self.items, self.samples, self.seed = lm, list(items), samples, seed
        self.params = params or SamplingParams()
        self.ask, self.show = ask, show
        self.log = PreferenceLog(out)
        self.journal_path = Path(str(out) + SESSION_SUFFIX)
        self.decisions = load_journal(self.journal_path)
        for prompt_id in self.decisions:
            self._write_pairs(prompt_id)  # finishes a ranking a crash cut short

    def done(self) -> set[str]:
        """Ids of the prompts ranked or skipped by this or an earlier session."""
        logged = {str(p.meta.get("prompt_id")) for p in self.log.pairs}
        return set(self.decisions) | logged

    def run(self) -> RankSummary:
        done = self.done()
        todo = [item for item in self.items if item.prompt_id not in done]
        ranked = skipped = pairs = 0
        for number, item in enumerate(todo, start=1):
            seed = prompt_seed(self.seed, item.prompt_id)
            params = dataclasses.replace(self.params, seed=seed)
            replies = sample_replies(self.lm, item.messages, self.samples, params)
            self._present(item, replies, f"[{number}/{len(todo)}]")
            answer = self._ask(len(replies))
            if answer == "quit":
                return RankSummary(
                    ranked, skipped, pairs, len(todo) - number + 1, True, self.log.path
                )
            if answer == "skip":
                self._record(item.prompt_id, {"status": "skipped"})
                skipped += 1
                continue
            record = {
                "status": "ranked",
                "order": list(answer),
                "replies": replies,
                "seed": seed,
                "messages": [dict(m) for m in item.messages],
                "meta": dict(item.meta),
            }
            self._record(item.prompt_id, record)
            pairs += self._write_pairs(item.prompt_id)
            ranked += 1
        return RankSummary(ranked, skipped, pairs, 0, False, self.log.path)

    def _present(self, item: PromptItem, replies: Sequence[str], counter: str) -> None:
        self.show(f"\n{counter} prompt {item.prompt_id}")
        for message in item.messages:
            label = "system: " if message["role"] == "system" else ""
            self.show(f"{label}{message['content']}")
        for i, reply in enumerate(replies, start=1):
            shown = reply.replace("\n", "\n     ") if reply else "(empty reply)"
            self.show(f"  {i}) {shown}")
        for group in duplicates(replies):
            numbers = ", ".join(map(str, group))
            self.show(
                f"note: replies {numbers} are identical (rank them anyway; "
                "no pair is kept between identical texts)"
            )

    def _ask(self, n: int) -> tuple[int, ...] | str:
        example = " ".join(str(i) for i in range(1, n + 1))
        question = f'rank best first (e.g. "{example}"), s = skip, q = quit: '
        while True:
            try:
                answer = self.ask(question)
            except EOFError:
                return "quit"
            try:
                return parse_ranking(answer, n)
            except ValueError as e:
                self.show(str(e))

    def _record(self, prompt_id: str, record: dict[str, Any]) -> None:
        self.decisions[prompt_id] = record
        atomic_write_json(self.journal_path, {"version": 1, "decisions": self.decisions}, None)

    def _write_pairs(self, prompt_id: str) -> int:
        """Append the pairs of a journalled ranking that the log lacks -> how many."""
        record = self.decisions[prompt_id]
        if record["status"] != "ranked":
            return 0
        item = PromptItem(prompt_id, tuple(record["messages"]), record["meta"])
        expected = pairs_from_ranking(
            item, record["replies"], record["order"], {"seed": record["seed"]}
        )
        have = {
            (p.chosen, p.rejected)
            for p in self.log.pairs
            if str(p.meta.get("prompt_id")) == prompt_id
        }
        missing = [p for p in expected if (p.chosen, p.rejected) not in have]
        self.log.extend(missing)
        return len(missing)


def load_journal(path: Path) -> dict[str, dict[str, Any]]:
    """The decisions of a session journal (``{}`` when there is none yet)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        decisions = data["decisions"]
        for record in decisions.values():
            if record["status"] == "ranked":
                _ = (record["order"], record["replies"], record["seed"], record["messages"])
            elif record["status"] != "skipped":
                raise KeyError("status")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise DataError(
            f"{path}: not a ranking-session journal ({type(e).__name__}: {e}); it is written "
            "by lmlab rank next to its --out file: delete it to forget the skipped prompts"
        ) from e
    return decisions


def rank(
    model: str,
    prompts: str,
    out: str = "prefs.jsonl",
    samples: int = 4,
    seed: int = 0,
    dtype: Literal["float32", "bfloat16", "auto"] | None = None,
    device: str = "auto",
    params: SamplingParams | None = None,
    ask: Callable[[str], str] = input,
    show: Callable[[str], None] = print,
) -> RankSummary:
    """Rank ``samples`` replies of ``model`` to each prompt of ``prompts`` and write the
    preference pairs to ``out`` (resumable: rerun with the same ``out`` to continue).

    Args:
        model: anything ``lmlab.load`` takes (a checkpoint, a run, ``"smollm2"``).
        prompts: a ``.jsonl`` file of ``{"prompt"}`` or instruction-task rows, or a text
            file with one prompt a line.
        out: the preference JSONL file; ``<out>.session.json`` records the decisions.
        samples: replies per prompt (>= 2).
        seed: base seed; each prompt samples with ``prompt_seed(seed, prompt_id)``.
        dtype: the model's dtype (``lmlab.load``): float32, bfloat16, auto, or None.
        device: where the model runs: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N, mps.
        params: decoding settings (temperature, top_p, max_new_tokens, ...); seed is set
            per prompt.
    """
    items = read_prompts(prompts)
    lm = load(model, dtype=dtype, device=device)
    session = RankingSession(lm, items, out, samples, seed, params, ask, show)
    return session.run()
