"""Voter: extracts final answers, takes the majority vote of a group, assigns rewards."""
