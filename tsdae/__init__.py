"""TSDAE on Ray: the model (``tsdae.model``), its training (``tsdae.train``) and its STS evaluation
(``tsdae.eval``), with what all three share: the config base (``tsdae.config``), device and precision
choices (``tsdae.device``) and durable writes (``tsdae.storage``). The corpus stage is the sibling
package ``pipeline``; ``jobs`` composes them into runs."""
