"""`python -m fmn_pl ...` is `fmn-pl ...`."""

from fmn_pl.cli import main

if __name__ == "__main__":
    main()
