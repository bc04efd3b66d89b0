"""The broker's client side: submit requests, read their reply streams, wait for them
(deadline, grace, a client that hung up).  Used by the front end and the batch worker;
it imports shared/ only."""
