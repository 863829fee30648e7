"""Grid obligations: the lifecycle of demand-response events and frequency sheds as a cap over
time, and their durable journal.
"""
