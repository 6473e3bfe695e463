"""Who may do what: tiers, quota rules and their ledger, the quota guard, idempotency,
accounts and keys.
"""
