"""A simulated fleet in one asyncio process, and the lost-tablet measurement.

``python -m device_sim fleet --server URL --devices N --key FILE --passphrase-env VAR [--processes P]``
(the stable command contract) plays the story the ledger exists for: an
operator's tablet is lost, the integrator revokes it, and we measure how long
each of N field devices keeps honouring it.

1. The :class:`Integrator` (the root key holder) syncs and verifies the whole
   ledger with only the anchor (into a :class:`ledger.mirror.Mirror`), makes
   the log grant when it is missing, and grants every device (from its own
   enrollment request) and one operator tablet, in batches of at most 1000
   records pushed by the one writer engine (:class:`ledger.writer.Writer`),
   whose ``seq``/``prev`` come from the verified state, never from the server.
2. The :class:`Fleet` boots the devices. **Bootstrap model ("template")**: a
   device cannot afford to apply the whole ledger N times over in one
   simulation process, so ONE template device syncs and verifies the whole
   ledger from genesis through the tiles, and every other device starts from
   a copy of that verified state. This models N devices having done the same
   deterministic computation. Each device still verifies its OWN grant
   (``own_grant="leaf"``: the record bytes it was handed, signed by the root
   and equal to the leaf the verified computation found at that seq; or
   ``own_grant="proof"``: an inclusion proof from ``GET /v1/proof/inclusion``
   checked against its own accepted checkpoint), and from then on verifies
   every record and checkpoint it receives by itself: that is the real
   per-device cost, and what the measurement times. Late starters (an
   option) skip the template and sync from genesis themselves.
3. Every device must accept the tablet through a real challenge-response
   (the tablet signs an auth message for each device's fresh challenge).
4. Push: ``sse`` (``GET /v1/events?records=1``) or ``poll`` (``GET
   /checkpoint`` and tiles every ``poll_interval``). One socket per device is
   the realistic model, but tens of thousands of sockets and SSE parsers in
   one Python process cost more than the devices themselves, so by default
   ``connections = min(N, 500)`` streams each fan their events out to a group
   of devices, like an edge relay or an HTTP cache would (``connections = N``
   is the one-socket-per-device model). Each device in a group still applies
   and verifies the update itself. The output names the model that ran.
   The tiles go through a shared single-flight :class:`TileCache`, as they
   would through any HTTP cache in front of the origin (tiles are
   immutable), and every request through :class:`FastTransport`, a small
   HTTP/1.1 transport under the same ``httpx.AsyncClient`` API (and so under
   the one fetch layer, :class:`ledger.client.AsyncClient`): httpcore's
   pool costs milliseconds of CPU per request, which this single process
   would otherwise report as propagation time.
5. Each device is given an auth the tablet signed, before the revoke, for an
   outstanding challenge. The integrator revokes the tablet (from a thread,
   so that the acknowledgement time is taken when the ``200`` arrives, not
   when the busy event loop gets round to it); each device, once it has
   applied an update that covers the revoke, runs ``check`` on that auth;
   the refusal time minus the acknowledgement time is its propagation time.
   A refusal that beats the acknowledgement (the push can overtake the HTTP
   answer) counts as 0 and is reported in ``refused_before_ack``.
6. Every device that applied the revoke posts its signed receipt (after the
   propagation phase by default, so that the simulator's own HTTP client
   does not slow down the devices being timed; ``receipts="during"`` posts
   each right after its refusal).

The lower bound: one revocation costs each device 5 Ed25519 verifications
(the revoke record, the checkpoint's 0x01 and 0x04 signatures, and in the
check the tablet's grant record and its auth signature). The fleet reports
``5 N / rate``, with the raw single-thread verify rate measured in the same
run: no propagation in a single process can beat it. With ``processes = P``
(``--processes``, :mod:`.shards`) the booted devices are shared among P
forked processes, each with its own push connections and event loop, so
P devices verify at a time, as real devices all do at once; the floor is
then ``lower_bound_s / P`` on P free cores (``lower_bound_parallel_s``).

Options a :class:`Fleet` offers beyond the command line's: devices offline
at the revoke that come back later (they catch up through the tiles), late
starters, clock drift, a fixed clock, bundle-only sites
(:meth:`Fleet.apply_bundle`) and per-device syncs against any server
(:meth:`Fleet.sync_all`, the hostile-server tests).
The package, one module per concern:

- :mod:`.integrator` — the root key holder's verified state and pushes;
- :mod:`.transport` — :class:`FastTransport`; :mod:`.cache` — :class:`TileCache`;
- :mod:`.model` — :class:`FleetOptions`, :class:`Member`, :class:`FleetResult`;
- :mod:`.devices` — the :class:`Fleet`; :mod:`.owngrant` — how a device checks
  its own grant; :mod:`.relay` — the push connections;
- :mod:`.shards` — the fleet shared among forked processes (``--processes``);
- :mod:`.lost_tablet` — :func:`run_lost_tablet`, one function per phase;
- :mod:`.plot` — :func:`plot_refusals`; :mod:`.cli` — the ``fleet`` command.

The measurement helpers (percentiles, resident memory) are
:mod:`device_sim.measure`'s, shared with the benchmarks and the reliability runs.
"""

from __future__ import annotations

from ..measure import percentile
from .cache import TileCache
from .cli import register
from .devices import Fleet
from .integrator import Integrator, Pushed
from .lost_tablet import run_lost_tablet
from .model import DEFAULT_CONNECTIONS, HTTP_CLIENTS, VERIFIES_PER_DEVICE, FleetOptions, FleetResult, Member
from .plot import plot_refusals
from .transport import FastTransport

__all__ = [
    "DEFAULT_CONNECTIONS",
    "HTTP_CLIENTS",
    "VERIFIES_PER_DEVICE",
    "FastTransport",
    "Fleet",
    "FleetOptions",
    "FleetResult",
    "Integrator",
    "Member",
    "Pushed",
    "TileCache",
    "percentile",
    "plot_refusals",
    "register",
    "run_lost_tablet",
]
