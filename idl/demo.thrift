// The demo service: a tiny calculator with a struct, an exception and a oneway method.
namespace py demo

struct Operation {
    1: required i32 left,
    2: required i32 right,
    3: optional string op = "+",
}

struct Answer {
    1: i64 value,
    2: string served_by,
}

exception CalcError {
    1: string message,
}

service Calculator {
    string ping(),
    Answer compute(1: Operation operation) throws (1: CalcError error),
    string echo(1: string text),
    void sleep_ms(1: i32 ms),
    oneway void record(1: string event),
}
