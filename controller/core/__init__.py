"""The decision core: fleet state, optimizer, policy, actuation, the price in force.

Fleet state as numpy arrays (`fleet_state.py`), the optimizer (`optimizer.py`, a pure
function of arrays), the policy rules around it (`policy.py`), actuation (`actuation.py`,
the commands a decision needs), the price in force (`prices.py`) and the campus's
headroom and cost steps (`campus.py`). No I/O, no clock, no config reads.
"""
