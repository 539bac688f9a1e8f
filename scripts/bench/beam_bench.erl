%% @doc The shapes of scripts/bench/core.py in plain Erlang/OTP, so that the mesh can be
%% compared with the BEAM on one machine. scripts/bench/beam.py compiles and runs it:
%%
%%   erl -noshell -sname NAME@localhost -setcookie COOKIE -pa DIR \
%%       -run beam_bench main CALLS ADDS CASTS TRIALS RUNS
%%
%% It prints `result NAME VALUE UNIT` lines (one per run, restarts one for all trials),
%% an `info ...` line about the VM, and halts (status 1 after an `error ...` line).
%%
%% - call_get_p50/p99 (us): CALLS sequential gen_server:call(Pid, get) to a counter in this
%%   node; call_add_p50/p99 the same with {add, 1} (ADDS calls). The state is in memory.
%% - cast_rate (msg/s): CASTS gen_server:cast(Pid, {add, 1}) into one counter, then one
%%   call(get) whose reply must count them all; from the first cast until that reply.
%% - restart_p50/p99 (us): a one_for_one supervisor with a registered counter; exit(Pid, kill),
%%   then calls to the registered name until one is answered by the new process; TRIALS kills.
%% - remote_get_p50/p99 (us): a second node started with peer (distribution over TCP on
%%   loopback), a counter there, and CALLS sequential calls to it from this node.
-module(beam_bench).
-behaviour(gen_server).

-export([main/1, start_counter/0]).
-export([init/1, handle_call/3, handle_cast/2]).

-define(NAME, beam_bench_counter).
-define(WARM_UP, 300).

main(Args) ->
    Status = try
                 [Calls, Adds, Casts, Trials, Runs] = [list_to_integer(A) || A <- Args],
                 info(),
                 repeat(Runs, fun() -> local_calls(Calls, Adds) end),
                 repeat(Runs, fun() -> casts(Casts) end),
                 restarts(Trials),
                 remote_calls(Calls, Runs),
                 0
             catch Class:Reason:Stack ->
                 io:format("error ~0p:~0p ~0p~n", [Class, Reason, Stack]),  % one line
                 1
             end,
    halt(Status).

%% --- the counter (and, for init(sup), its supervisor) -----------------------------------

start_counter() ->
    gen_server:start_link({local, ?NAME}, ?MODULE, 0, []).

init(sup) ->
    Flags = #{strategy => one_for_one, intensity => 1000, period => 1},
    {ok, {Flags, [#{id => counter, start => {?MODULE, start_counter, []}}]}};
init(N) ->
    {ok, N}.

handle_call(get, _From, N) -> {reply, N, N};
handle_call(pid, _From, N) -> {reply, self(), N};
handle_call({add, D}, _From, N) -> {reply, N + D, N + D}.

handle_cast({add, D}, N) -> {noreply, N + D}.

%% --- the figures -----------------------------------------------------------------------

local_calls(Calls, Adds) ->
    {ok, Pid} = gen_server:start(?MODULE, 0, []),
    _ = times(Pid, get, ?WARM_UP),
    latency("call_get", times(Pid, get, Calls)),
    latency("call_add", times(Pid, {add, 1}, Adds)),
    gen_server:stop(Pid).

casts(N) ->
    {ok, Pid} = gen_server:start(?MODULE, 0, []),
    T = erlang:monotonic_time(),
    cast_n(Pid, N),
    N = gen_server:call(Pid, get, 60000),
    result("cast_rate", N / (us_since(T) / 1.0e6), "msg/s"),
    gen_server:stop(Pid).

cast_n(_Pid, 0) -> ok;
cast_n(Pid, N) -> gen_server:cast(Pid, {add, 1}), cast_n(Pid, N - 1).

restarts(Trials) ->
    %% each kill would log a supervisor report: the printing is not what is measured
    ok = logger:add_primary_filter(no_reports, {fun logger_filters:domain/2, {stop, sub, [otp, sasl]}}),
    {ok, Sup} = supervisor:start_link(?MODULE, sup),
    unlink(Sup),
    latency("restart", [restart_once() || _ <- lists:seq(1, Trials)]),
    gen_server:stop(Sup).

restart_once() ->
    Old = whereis(?NAME),
    T = erlang:monotonic_time(),
    exit(Old, kill),
    wait_for_new(Old),
    us_since(T).

%% noproc while the name is free (the old pid cannot answer: the kill was sent first).
%% The yield lets the supervisor run: a loop that never waits would hold its scheduler
%% for a whole time slice per try.
wait_for_new(Old) ->
    try gen_server:call(?NAME, pid) of
        Old -> erlang:yield(), wait_for_new(Old);
        _New -> ok
    catch exit:_ -> erlang:yield(), wait_for_new(Old)
    end.

remote_calls(Calls, Runs) ->
    [Name, Host] = string:split(atom_to_list(node()), "@"),
    Args = ["-setcookie", atom_to_list(erlang:get_cookie()), "-start_epmd", "false",
            "-kernel", "inet_dist_use_interface", "{127,0,0,1}",
            "-pa", filename:dirname(code:which(?MODULE))],
    {ok, Peer, Node} = peer:start_link(#{name => Name ++ "_peer", host => Host,
                                         detached => false, args => Args}),
    try
        {ok, Pid} = erpc:call(Node, gen_server, start, [?MODULE, 0, []]),
        _ = times(Pid, get, ?WARM_UP),
        repeat(Runs, fun() -> latency("remote_get", times(Pid, get, Calls)) end)
    after
        peer:stop(Peer)
    end.

%% --- helpers ---------------------------------------------------------------------------

times(Pid, Msg, N) ->
    [begin T = erlang:monotonic_time(), gen_server:call(Pid, Msg), us_since(T) end
     || _ <- lists:seq(1, N)].

us_since(T) ->
    erlang:convert_time_unit(erlang:monotonic_time() - T, native, nanosecond) / 1000.

repeat(N, Fun) -> lists:foreach(fun(_) -> Fun() end, lists:seq(1, N)).

latency(Name, Us) ->
    result(Name ++ "_p50", pct(Us, 0.5), "us"),
    result(Name ++ "_p99", pct(Us, 0.99), "us").

%% The same percentile as core.py's pct: the nearest rank of the sorted values.
pct(Values, Q) ->
    Sorted = lists:sort(Values),
    lists:nth(1 + round(Q * (length(Sorted) - 1)), Sorted).

result(Name, Value, Unit) ->
    io:format("result ~s ~.3f ~s~n", [Name, float(Value), Unit]).

info() ->
    io:format("info Erlang/OTP ~s, erts ~s, ~p schedulers~n",
              [erlang:system_info(otp_release), erlang:system_info(version),
               erlang:system_info(schedulers_online)]).
