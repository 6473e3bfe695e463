"""Moderation: prompts checked against a shipped list of terms, images (uploads and
outputs) by a pluggable checker; what each tier gets is in the tier file."""
