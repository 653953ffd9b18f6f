"""`moba-ask eval`: RepoQA-style needle, definition and caller tasks built from Python repositories,
answered over one prefilled context per repository, context size and attention config, scored for
answers and citations, with bootstrap intervals.

Modules: `tasks` (the task builder: a temp copy of the repository with the needle docstrings
stripped, packed once), `callers` (the "which function calls X" family from the AST), `configs`
(the attention config spec language), `scoring` (exact match, sentence BLEU and the RepoQA rule,
citation ranks and overlaps, line precision/recall, bogus citations), `bm25` and `baselines` (BM25
over files and over function chunks, a random file), `runner` (the question loop), `stats`
(bootstrap intervals and paired differences), `report` (aggregation, JSON and markdown). Knows no
terminal: the CLI renders.
"""
