"""The mobile tier: thin wiring over shared/ (the tier loop lives in shared.serving.tier)."""
