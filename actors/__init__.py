"""Ray actor shells of a mycellm node: they own state and concurrency; the logic is in mycellm/."""
