// A service whose method names are the client's own attribute names (issue 10 B6).
service Odd {
    string table(),
    string env(),
    string appkey(),
    string service_name(),
    string close(),
    string with_timeout(1: i32 ms),
    string _pool(),
    string _call(),
    i32 put(1: string blob, 2: i32 n),
}
