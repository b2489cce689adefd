"""Tests of the signed values of networks (mycellm/federation)."""
