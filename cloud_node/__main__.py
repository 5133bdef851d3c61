"""`python -m cloud_node [--flags]`: serve the cloud tier (env TIERSERVE_CLOUD_*, flags)."""

from shared.serving.server import main

if __name__ == "__main__":
    main("cloud")
