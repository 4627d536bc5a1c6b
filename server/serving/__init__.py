"""Running the plane: the processes, their sockets and connections, and refusing work past capacity.

serve.py        start, wait for a signal, shut down in named steps
workers.py      several plane processes on one machine sharing the ports (`hatchway serve --workers N`)
acceptor.py     accepting connections off the event loop, so overload is refused at once
connections.py  what one client connection may cost, and what a malformed one is told
overload.py     load shedding: past capacity, say so at once instead of queueing
"""
