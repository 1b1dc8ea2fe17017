"""docs/results.md and docs/demo/report.md, regenerated from the committed results bundles alone (docs/evidence/).

    python research/results.py            # rewrite both documents from docs/evidence/ (under a minute)
    python research/results.py --check    # exit 1 when a committed document differs from what its bundle gives
    python research/results.py --collect  # first copy the bundles of finished runs (runs/reference, runs/demo)

The bundles come from `fmn-pl pipeline --config configs/pipeline/reference.yaml` (three seeds) and
`bash scripts/demo.sh` (one seed); each records the config that produced it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from fmn_pl.bundle import read_all
from fmn_pl.evidence import Evidence
from fmn_pl.evidence_report import results_page

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python research/results.py"

# What the earlier FMN option study (docs/study/) decided while looking at validation scores: said once, here.
HISTORY = """## What earlier decisions looked at validation rows

- Before this study, every checkpoint's exported epoch was picked on the full validation split that was then
  reported (RTE: the best of 5 epochs on 277 rows), and the demo picked epochs and scored merges on the same
  300 rows. Now the epoch is picked on held-out training rows (`tests/test_evidence.py` checks that no
  validation row reaches a choice).
- FMN's default grid (`normalize` from [none, mean], `power` from [0.25, 0.5, 0], `scaling` from [1, 1.5, 2,
  2.5]: 20 candidates) was chosen per merge on held-out rows, but the grid itself was settled in
  [docs/study/](study/README.md) by counting *validation* wins over several rounds on seeds 42-48. The other
  methods' settings were never tuned that way. The seeds here (1, 2, 3) are ones that study never saw, so the
  `fmn` column above re-judges those defaults out of sample.
- Earlier versions of this page compared the 20-candidate FMN with 10-candidate task arithmetic and TIES and
  with unsearched Fisher merging, and called wins of 0.05 points. Every comparison here states its budget, and
  a difference is a win only where its interval excludes 0.
"""


@dataclass(frozen=True)
class Document:
    """One committed document and the bundle folder it is regenerated from."""

    path: Path
    bundle: Path
    run: Path  # where a finished pipeline run leaves the bundles (--collect)
    history: bool = False

    def render(self) -> str:
        text = results_page(Evidence(read_all(self.bundle)))
        return text + "\n" + HISTORY if self.history else text


DOCUMENTS = [
    Document(
        ROOT / "docs" / "results.md",
        ROOT / "docs" / "evidence" / "reference",
        ROOT / "runs" / "reference",
        history=True,
    ),
    Document(
        ROOT / "docs" / "demo" / "report.md",
        ROOT / "docs" / "evidence" / "demo",
        ROOT / "runs" / "demo",
    ),
]


def collect(doc: Document) -> None:
    """Bundle the finished run `doc.run` (one run, or seed-*/) afresh into `doc.bundle`, one folder per seed."""
    import yaml

    from fmn_pl.bundle import collect as bundle_run
    from fmn_pl.bundle import write

    finished = [p for p in [*sorted(doc.run.glob("seed-*")), doc.run] if (p / "stamps" / "report.json").is_file()]
    if not finished:
        print(f"{doc.run}: no finished run (its report stage has not run): nothing collected")
    for run in finished:
        target = doc.bundle / run.name if run != doc.run else doc.bundle
        seed = yaml.safe_load((run / "pipeline.yaml").read_text())["fit"]["seed"]
        write(bundle_run(run, seed), target)
        print(f"bundled {run} -> {target}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare, write nothing; exit 1 on a difference")
    p.add_argument("--collect", action="store_true", help="copy the finished runs' bundles into docs/evidence/")
    args = p.parse_args(argv)
    stale = []
    for doc in DOCUMENTS:
        if args.collect:
            collect(doc)
        if not doc.bundle.is_dir() and not args.check:
            print(f"{doc.bundle} holds no bundle yet: {doc.path.relative_to(ROOT)} left as it is")
            continue
        text = doc.render()
        if args.check:
            if not doc.path.is_file() or doc.path.read_text() != text:
                stale.append(doc.path)
            continue
        from fmn_pl.files import atomic_write

        atomic_write(doc.path, text)
        print(f"wrote {doc.path.relative_to(ROOT)}")
    for path in stale:
        print(f"{path.relative_to(ROOT)} differs from what its bundle regenerates: run `{COMMAND}`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
