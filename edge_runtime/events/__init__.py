"""The node's events: ``log`` (the durable SQLite event log with group commit), ``pseudonym`` (HMAC shopper ids:
no raw id is ever stored), ``analytics`` (events/s, active shoppers, top items at bounded cost)."""
