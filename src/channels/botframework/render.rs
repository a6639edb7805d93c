//! Pure translation of the model into Bot Framework Connector v3 requests.
