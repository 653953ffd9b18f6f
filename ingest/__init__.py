"""ingest: pack a repository or a document set into one context with an exact token -> file:line map.

    >>> from ingest import pack, PackOptions
    >>> p = pack(["repo/"], tokenizer, PackOptions(max_tokens=200_000))
    >>> p.ids, p.text, p.files[0].path, p.source_map.locate(1234)

Pack order (deterministic): READMEs first (shallowest first), then other docs (.md, .rst, .txt,
.pdf, ... and anything under doc/ or docs/), then all other files grouped by directory (a
directory's files before its subdirectories, names compared case-insensitively).

File set, default excludes, secrets, budget drop priority and the rendered layout are documented
in ingest/README.md. The package never imports torch and never writes inside the packed tree; its
only write is the token cache, in the directory `PackOptions.token_cache` names (none when it is None).
It reads no environment variable of moba-ask's.
"""

from ingest.pack import pack
from ingest.records import FileRecord, Pack, PackError, PackOptions
from ingest.sourcemap import SourceMap

__all__ = ["FileRecord", "Pack", "PackError", "PackOptions", "SourceMap", "pack"]
