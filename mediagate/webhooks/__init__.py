"""Webhooks: endpoints registered per account, events written to the state store's
outbox with the transition that finished their job, and a sender that delivers them
at least once, signed as Standard Webhooks, to addresses the operator allows."""
