"""The Trio runtime: runners, shard nurseries, entity tasks and their mailboxes."""
