"""The decision core: fleet state as numpy arrays, the optimizer (a pure function), the policy
rules around it, and actuation (the commands a decision needs).
"""
