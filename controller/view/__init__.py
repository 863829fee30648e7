"""The operator's live view of a site, rendered from a decision summary.

One view for two callers: `mineops demo` renders the summary of its own controller's
latest `DecisionSnapshot`; `mineops top` renders the retained `DecisionSummary` it reads
from `mineops/<site>/controller/decision` of a running daemon. Both therefore show
exactly what the controller published. `clock` maps the decision's Unix times to the
site's clock (a simulated one in the demo), `site` renders a panel for a terminal and a
line for a pipe, `progress` shows how far a long job is.
"""

from controller.view.clock import SiteClock
from controller.view.site import SiteView, read_summary

__all__ = ["SiteClock", "SiteView", "read_summary"]
