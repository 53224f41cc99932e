"""``unipeft search``: the best points of He et al.'s design space under a budget, found with Optuna, trials
trained several at once on one base (:func:`unipeft.train.multi.train_jobs`). See docs/search.md.

    from unipeft.search import load_search_config, search
    outcome = search(load_search_config("configs/search_sst2.yaml", ["budget.trials=8"]))
"""

from __future__ import annotations

from pathlib import Path

from unipeft.search.config import SearchConfig, load_search_config, search_config_from_dict
from unipeft.search.driver import SearchOutcome, run_search
from unipeft.search.report import front, write_report
from unipeft.search.space import SEARCHABLE_FORMS, SearchSpace, space_from_dict


def search(config: SearchConfig) -> tuple[SearchOutcome, dict[str, Path]]:
    """Run (or resume) the search and write its report; returns the outcome and the report's paths."""
    outcome = run_search(config)
    paths = write_report(config, outcome.study, wall_time_s=outcome.wall_time_s, steps=outcome.steps,
                         stopped_early=outcome.stopped_early)
    return outcome, paths


__all__ = ["search", "run_search", "write_report", "front", "SearchConfig", "SearchOutcome", "SearchSpace",
           "SEARCHABLE_FORMS", "load_search_config", "search_config_from_dict", "space_from_dict"]
