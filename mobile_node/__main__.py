"""`python -m mobile_node [--flags]`: serve the mobile tier (env TIERSERVE_MOBILE_*, flags)."""

from shared.serving.server import main

if __name__ == "__main__":
    main("mobile")
