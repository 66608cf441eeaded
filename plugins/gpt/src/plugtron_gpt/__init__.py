"""The GPT family plugin. Importing it is cheap; torch loads only when building."""
