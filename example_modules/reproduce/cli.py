"""The whole reproduction and its command line, ``python -m example_modules.reproduce``.

:func:`reproduce` runs both experiments (:mod:`example_modules.reproduce.runner`), checks the
paper's claims (:mod:`example_modules.reproduce.paper`) and writes the report, both by
:mod:`example_modules.reproduce.report`; :func:`main` parses the arguments, runs it and prints
the headline tables and the claims.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from example_modules.reproduce.report import (
    RESULTS_FILENAME,
    check_claims,
    headline,
    render_results_markdown,
    write_figures,
)
from example_modules.reproduce.runner import (
    ReproductionConfig,
    ReproductionResults,
    run_modular,
    run_tms,
)

DEFAULT_OUT = "entk_reproduction"

# --------------------------------------------------------------------------------------------
# The whole reproduction


def reproduce(
    config: ReproductionConfig | None = None, out: str | Path = DEFAULT_OUT
) -> ReproductionResults:
    """Run both experiments, check the claims, and write ``results.md`` and the figures to
    ``out`` (created if missing).

    Returns:
        The :class:`~example_modules.reproduce.runner.ReproductionResults`, with
        :attr:`~example_modules.reproduce.runner.ReproductionResults.figures` the PNGs written.
    """
    config = ReproductionConfig() if config is None else config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    m = config.modular
    _say(f"modular addition: p={m.p}, hidden={m.hidden}, {m.epochs} epochs ...")
    modular = run_modular(m)
    _say(f"  done in {modular.seconds:.0f} s")
    _say(f"Toy Models of Superposition: {len(config.tms.configs)} configs ...")
    tms = run_tms(config.tms)
    _say(f"  done in {sum(t.seconds for t in tms):.0f} s")
    results = ReproductionResults(
        config=config, modular=modular, tms=tms, checks=check_claims(modular), seconds=math.nan
    )
    results.figures = [path.name for path in write_figures(results, out)]
    results.seconds = time.perf_counter() - start  # everything but writing results.md
    (out / RESULTS_FILENAME).write_text(render_results_markdown(results))
    return results


def _say(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------
# Command line


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's per-fit banners (accelerator, seed) off, restored after."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> ReproductionResults:
    """Run the reproduction from the command line (``argv`` without the program name; ``None``
    reads ``sys.argv``), print the headline tables and the claims, and return the results."""
    parser = argparse.ArgumentParser(
        prog="python -m example_modules.reproduce",
        description="Reproduce arXiv:2510.00468 on the bundled modular-addition MLP and Toy "
        "Models of Superposition; write results.md and PNG figures.",
    )
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--small", action="store_true", help="reduced sizes, for a quick check (~20 s)"
    )
    args = parser.parse_args(argv)
    config = ReproductionConfig.small() if args.small else ReproductionConfig()
    with _quiet_lightning():
        results = reproduce(config, args.out)
    print(headline(results))
    print(f"results and figures in {Path(args.out).resolve()}")
    return results
