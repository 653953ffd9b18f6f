"""`moba-ask eval`: RepoQA-style needle tasks built from any Python repository, answered over one
prefilled context per attention config, scored for answers and citations.

Modules: `tasks` (the task builder: a temp copy of the repository with the needle docstrings
stripped, packed once), `scoring` (exact match, sentence BLEU and the RepoQA rule, citation
hit@k/MRR, line precision/recall, bogus citations), `bm25` (the lexical file baseline), `runner`
(configs, the question loop, aggregation, JSON and markdown). Knows no terminal: the CLI renders.
"""
