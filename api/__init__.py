"""The API core: what a request means, without any transport.

The request structs and their checks per skill (schemas, chat_schemas, batch_schemas),
image decoding (images, remote_image), model/variant naming (models), request parsing
(parsing) and the errors as plain exceptions with a status and a code (errors).
The Falcon front end, the batch worker and the CLI build on this package; it imports
only shared/ and third-party libraries, never frontend/, batch_worker/ or broker_client/."""
