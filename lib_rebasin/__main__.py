import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C before the CLI's own handling is in place
    print("\ninterrupted by Ctrl-C: no output was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
