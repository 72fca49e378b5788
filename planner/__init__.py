"""MEMO memory planner: activation swap fraction and dynamic storage allocation plans."""
