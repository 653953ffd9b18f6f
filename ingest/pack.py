"""`pack()`: paths -> one packed context (text, token ids, token -> file:line map).

Pipeline: walk.collect (file set) -> readers.read (text with secrets redacted, or skip reason) ->
render (order, sections) -> tokens (batch encode with exact marks, disk cache) -> when over budget,
outline (signature lines) and budget (which files whole, as outlines, or dropped) -> assemble the
ids, the text and the SourceMap. From the read on, every path is the
display form (`render.display_path`), so the text, the records, the source map and the skipped
list agree; a secret inside a skipped file's name is redacted in the skipped list too. Writes only to the token cache, never inside the packed tree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest import budget, outline, readers, render, rules, secrets, walk
from ingest.records import BudgetError, FileRecord, Pack, PackError, PackOptions
from ingest.sourcemap import SourceMap
from ingest.tokens import BATCH_CHARS, Encoder, TokenCache, section_key

Progress = Callable[[int, int], None]


@dataclass
class _Doc:
    rel: str
    text: str
    flags: tuple[str, ...]
    size: int
    redacted: tuple[tuple[int, str], ...] = ()


@dataclass
class _Section:
    doc: _Doc
    text: str
    ids: np.ndarray
    marks: np.ndarray
    lines: int
    shown: tuple[int, ...] | None = None  # an outline: the real numbers of the lines it shows


def pack(paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer,
         options: PackOptions | None = None, progress: Progress | None = None) -> Pack:
    """Pack files under paths into one context for `tokenizer`.

    Args:
        paths: a directory, a file, or several of either. The pack root is the single directory
            given, else the common parent of all paths; file paths in the pack are relative to it.
        tokenizer: a transformers fast tokenizer or a `tokenizers.Tokenizer`.
        options: `PackOptions`. Default: PackOptions().
        progress: called as progress(files_done, files_total) while encoding. Default: None.

    Returns:
        `Pack` (ids, text, files, skipped, dropped, source_map, content_hash, root).

    Raises:
        PackError: a path does not exist, nothing is left to pack, or the budget cannot be met
            (always when `options.drop` is False and the pack is over `max_tokens`).
        TypeError: tokenizer is not a supported fast tokenizer.

    >>> p = pack("repo/", tokenizer, PackOptions(max_tokens=100_000))
    >>> p.source_map.locate(p.files[0].token_start + 5)
    ('README.md', 1)
    """
    options = options or PackOptions()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    encoder = Encoder(tokenizer)
    root, cands, skipped, notes = walk.collect([os.fspath(p) for p in paths], options)
    docs = _read_all(cands, options, skipped)
    skipped = sorted((render.display_path(secrets.redact(path)[0]), reason) for path, reason in skipped)
    if not docs:
        raise PackError(_nothing_to_pack(root, skipped))
    docs.sort(key=lambda d: render.order_key(d.rel))
    cache = _cache(options, root, encoder.identity)
    sections = _encode_files(docs, encoder, cache, options.line_numbers, progress)
    tree, kept, outlined, dropped = _fit(sections, encoder, cache, options, render.display_path(Path(root).name))
    pk = _assemble(root, tree, kept, dropped, skipped, encoder.identity)
    redacted = tuple((s.doc.rel, line, kind) for s in kept for line, kind in s.doc.redacted
                     if s.shown is None or line in s.shown)
    return dataclasses.replace(pk, redacted=redacted, outlined=outlined,
                               notes=tuple(render.display_path(n) for n in notes))


def _nothing_to_pack(root: str, skipped: list[tuple[str, str]]) -> str:
    head = f"no files to pack under {render.display_path(root)} ({len(skipped)} skipped)"
    if len(skipped) == 1:
        return f"{head}; {skipped[0][0]}: {skipped[0][1]}"
    return f"{head}; check the path, --include/--exclude and .gitignore"


def _read_all(cands: list[walk.Candidate], options: PackOptions, skipped: list) -> list[_Doc]:
    docs = []
    for c in cands:
        try:
            got = readers.read(c.abs, c.rel, options)
        except readers.Skip as e:
            skipped.append((c.rel, str(e)))
        except OSError as e:
            skipped.append((c.rel, f"unreadable ({e.strerror or type(e).__name__})"))
        else:
            docs.append(_Doc(render.display_path(c.rel), got.text, got.flags, got.size, got.redacted))
    return docs


def _cache(options: PackOptions, root: str, tokenizer_id: str) -> TokenCache:
    if options.token_cache is None:
        return TokenCache(None, tokenizer_id)
    directory = Path(options.token_cache)
    resolved = str(directory.resolve())
    inside = os.path.commonpath([root, resolved]) == root
    return TokenCache(directory, tokenizer_id, writable=not inside)


def _encode_files(docs: list[_Doc], encoder: Encoder, cache: TokenCache, line_numbers: bool,
                  progress: Progress | None) -> list[_Section]:
    rendered = [(d, *render.file_section(d.rel, d.text, line_numbers), None) for d in docs]
    return _encode(rendered, encoder, cache, progress)


def _encode_outlines(sections: list[_Section], encoder: Encoder, cache: TokenCache) -> dict[str, tuple]:
    """rel -> (outline _Section, how) for each file with an outline smaller than its full section,
    else (None, why there is none)."""
    out, rendered, how = {}, [], {}
    for s in sections:
        try:
            found = outline.outline(s.doc.rel, s.doc.text)
        except outline.NoOutline as e:
            out[s.doc.rel] = (None, str(e))
            continue
        rendered.append((s.doc, *render.outline_section(s.doc.rel, s.doc.text, found.lines), found.lines))
        how[s.doc.rel] = found.how
    for o, full in zip(_encode(rendered, encoder, cache, None), (s for s in sections if s.doc.rel in how)):
        small = len(o.ids) < len(full.ids)
        out[o.doc.rel] = (o, how[o.doc.rel]) if small else (None, "its outline is not smaller than the file")
    return out


def _encode(rendered: list[tuple], encoder: Encoder, cache: TokenCache, progress: Progress | None) -> list[_Section]:
    """Sections for (doc, text, line starts, footer start, shown lines or None), from the cache or encoded."""
    out: list[_Section | None] = []
    todo = []
    for i, (d, text, starts, footer, shown) in enumerate(rendered):
        cuts = [0, *starts, footer]
        key = section_key(text, f"{render.RENDER_VERSION}|{len(cuts)}|{footer}")
        hit = cache.get(key)
        n = render.line_count(d.text) if shown else len(starts)
        out.append(_Section(d, text, *hit, n, shown) if hit else None)
        if hit is None:
            todo.append((i, text, cuts, key, n))
    done = len(rendered) - len(todo)
    _report(progress, done, len(rendered))
    for batch in _batches(todo):
        encoded = encoder.encode([t[1] for t in batch], [t[2] for t in batch])
        for (i, text, _, key, n), (ids, marks) in zip(batch, encoded, strict=True):
            cache.put(key, ids, marks)
            out[i] = _Section(rendered[i][0], text, ids, marks, n, rendered[i][4])
        done += len(batch)
        _report(progress, done, len(rendered))
    return out


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def _batches(todo: list) -> list[list]:
    batches, cur, size = [], [], 0
    for item in todo:
        cur.append(item)
        size += len(item[1])
        if size >= BATCH_CHARS:
            batches.append(cur)
            cur, size = [], 0
    return batches + ([cur] if cur else [])


def _encode_tree(rels: list[str], name: str, encoder: Encoder, cache: TokenCache, line_numbers: bool,
                 outlined: frozenset[str] = frozenset()):
    text = render.tree_section(name, rels, line_numbers, outlined)
    key = section_key(text, f"{render.RENDER_VERSION}|tree")
    hit = cache.get(key)
    if hit is None:
        hit = encoder.encode([text], [[0]])[0]
        cache.put(key, *hit)
    return text, hit[0]


def _fit(sections: list[_Section], encoder: Encoder, cache: TokenCache, options: PackOptions, name: str):
    """(tree, kept sections in pack order (outlines among them), outlined, dropped) within max_tokens.

    The tree is budgeted first as listing every file, each one with an outline marked "(outline)"
    (an upper bound); a plan that still overshoots (tokens merge differently) is redone with the
    room lowered by the overshoot. From the room the fitting plan's real tree leaves, a few wider
    plans are tried the same way, and the first that fits is taken."""
    limit = options.max_tokens
    tree = _encode_tree([s.doc.rel for s in sections], name, encoder, cache, options.line_numbers)
    total = len(tree[1]) + sum(len(s.ids) for s in sections)
    if limit is None or total <= limit:
        return tree, sections, (), []
    if not options.drop:
        raise PackError(f"the pack is {total:,} tokens, over --max-tokens {limit:,}; allow outlining and "
                        "dropping files (remove --no-drop), raise --max-tokens, or narrow with --exclude")
    outlines = _encode_outlines(sections, encoder, cache)
    items = [_item(s, *outlines[s.doc.rel]) for s in sections]

    def tree_of(secs: list[_Section]):
        marked = frozenset(s.doc.rel for s in secs if s.shown is not None)
        return _encode_tree([s.doc.rel for s in secs], name, encoder, cache, options.line_numbers, marked)

    def attempt(room: int):
        """((tree, kept, outlined, dropped), tokens over the limit) for the budget plan at `room`."""
        choices = {c.item.path: c for c in budget.plan(items, room)}
        kept = [s if choices[s.doc.rel].form == budget.FULL else outlines[s.doc.rel][0]
                for s in sections if choices[s.doc.rel].form != budget.DROP]
        if not kept:
            need = min(it.smallest for it in items) + len(tree_of([])[1])
            raise BudgetError(f"--max-tokens {limit:,} is too small for any file here (the smallest needs about "
                            f"{need:,} tokens with the tree); raise it or narrow the paths")
        tree = tree_of(kept)
        over = len(tree[1]) + sum(len(s.ids) for s in kept) - limit
        return (tree, kept, _outlined(kept, choices), _dropped(choices)), over

    room = limit - len(tree_of([outlines[s.doc.rel][0] or s for s in sections])[1])
    for _ in range(8):
        fit, over = attempt(room)
        if over <= 0:
            break
        room -= over
    else:
        raise BudgetError(f"could not fit the pack into --max-tokens {limit:,}; raise it or narrow the paths")
    wider = limit - len(fit[0][1])
    for _ in range(4):
        if wider <= room:
            break
        better, over = attempt(wider)
        if over <= 0:
            return better
        wider -= over
    return fit


def _item(s: _Section, small: _Section | None, note: str) -> budget.Item:
    kind = rules.file_kind(s.doc.rel, s.doc.text[:400])
    return budget.Item(s.doc.rel, kind, len(s.ids), s.doc.text, None if small is None else len(small.ids), note)


def _outlined(kept: list[_Section], choices: dict[str, budget.Choice]) -> tuple:
    return tuple((s.doc.rel, len(s.ids), choices[s.doc.rel].item.tokens, choices[s.doc.rel].reason)
                 for s in kept if s.shown is not None)


def _dropped(choices: dict[str, budget.Choice]) -> list:
    return [(c.item.path, c.item.tokens, c.reason) for c in choices.values() if c.form == budget.DROP]


def _assemble(root: str, tree, kept: list[_Section], dropped: list, skipped: list, tokenizer_id: str) -> Pack:
    tree_text, tree_ids = tree
    parts = [(None, 0, np.zeros(1, np.int64), 0)]
    records, pos = [], len(tree_ids)
    for s in kept:
        n = len(s.ids)
        parts.append((s.doc.rel, pos, s.marks, s.lines if s.shown is None else s.shown))
        flags = s.doc.flags if s.shown is None else (*s.doc.flags, "outline")
        records.append(FileRecord(s.doc.rel, n, pos, pos + n, s.lines, s.doc.size, flags))
        pos += n
    ids = np.concatenate([tree_ids, *(s.ids for s in kept)]).astype(np.int64)
    digest = hashlib.blake2b(tokenizer_id.encode(), digest_size=16)
    digest.update(ids.astype("<i8").tobytes())
    return Pack(ids=ids, text=tree_text + "".join(s.text for s in kept), files=tuple(records),
                skipped=tuple(skipped), dropped=tuple(dropped),
                source_map=SourceMap.from_sections(parts, pos), content_hash=digest.hexdigest(),
                root=root, tree_tokens=len(tree_ids))
