"""`python -m edge_node [--flags]`: serve the edge tier (env TIERSERVE_EDGE_*, flags)."""

from shared.serving.server import main

if __name__ == "__main__":
    main("edge")
