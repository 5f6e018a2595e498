//! The `flashgate` command (being written).

fn main() {
    println!("flashgate");
}
