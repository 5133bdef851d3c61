"""The cloud tier: thin wiring over shared/ (the tier loop lives in shared.serving.tier)."""
