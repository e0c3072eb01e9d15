"""``python -m gpugroup``: the same command line as the ``gpugroup`` script."""

from gpugroup.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
