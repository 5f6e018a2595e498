//! The cli crate's integration tests in one binary (each module's header says what it covers): one
//! link of the crate's dependencies instead of one per file.

mod support;

mod admin_guards;
mod agent_serve;
mod broker_check;
mod broker_processes;
mod chaos;
mod deploy_files;
mod json_output;
mod lab_flow;
mod readme_flows;
mod shell_conventions;
mod terminal;
