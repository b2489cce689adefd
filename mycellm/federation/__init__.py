"""Networks: their identity and signed description, memberships, invites and member revocations."""
