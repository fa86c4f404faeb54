"""`python -m sgm.sample`: the sampling CLI (sgm.inference.cli), under its short name."""

from sgm.inference.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
