using System.CommandLine;
using System.CommandLine.Help;
using System.CommandLine.Invocation;
using System.CommandLine.Parsing;
using System.Runtime.CompilerServices;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization.Metadata;
using Vmsnap.Live.Libvirt;
using Vmsnap.Qcow2;

namespace Vmsnap.Cli;

/// <summary>Shared command-line plumbing: the root command, error handling, exit codes, signals, JSON, sizes.</summary>
internal static class Cli
{
    internal const int ExitOk = 0, ExitFailure = 1, ExitUsage = 2;

    /// <summary>The exit codes every command shares, as <c>--help</c> lists them (a command may add its own, see <see cref="AddExitCodes"/>).</summary>
    internal static readonly IReadOnlyList<(int Code, string Meaning)> ExitCodes =
    [
        (ExitOk, "success"),
        (ExitFailure, "failure; one line on stderr says why, and every file is left as it was"),
        (ExitUsage, "usage error: unknown command or option, missing or invalid argument"),
        (128 + 2, "stopped by SIGINT (Ctrl-C); what the command had written is undone"),
        (128 + 15, "stopped by SIGTERM; what the command had written is undone"),
    ];

    /// <summary>
    /// <c>--output=human|json</c> as qemu-img spells it, on every command (from the root down);
    /// <c>--output=json</c> is the same as <c>--json</c>.
    /// </summary>
    internal static readonly Option<string?> OutputOption = CreateOutputOption();

    private static Option<string?> CreateOutputOption()
    {
        var option = new Option<string?>("--output") { Description = "Output format, as qemu-img's: human (default) or json (the same as --json)", Recursive = true };
        option.AcceptOnlyFromAmong("human", "json");
        return option;
    }

    private static readonly ConditionalWeakTable<Command, List<(int Code, string Meaning)>> CommandExitCodes = new();

    /// <summary>
    /// The root command with these commands; every command gets <c>--output</c>, and <c>--help</c> lists the exit
    /// codes. When the first of <paramref name="args"/> names one of the commands, only that one is built: nothing
    /// else is needed to parse and run it (the root's help, --version and a usage error get them all).
    /// </summary>
    internal static RootCommand Root(string description, string[]? args, params IEnumerable<CommandFactory>[] groups)
    {
        var root = new RootCommand(description);
        List<CommandFactory> all = [.. groups.SelectMany(g => g)];
        List<CommandFactory> named = args is [string first, ..] ? all.FindAll(f => f.Name == first) : [];
        foreach (CommandFactory f in named.Count == 1 ? named : all)
        {
            Command c = f.Create();
            if (c.Name != f.Name) throw new InvalidOperationException($"the command built for '{f.Name}' is named '{c.Name}'");
            root.Subcommands.Add(c);
        }
        root.Options.Add(OutputOption);
        HelpOption help = root.Options.OfType<HelpOption>().Single();
        help.Action = new HelpWithExitCodes((SynchronousCommandLineAction)help.Action!);
        CommandReference.AddTo(root);
        return root;
    }

    /// <summary>Documents exit codes of this command besides (or instead of) the shared ones in <see cref="ExitCodes"/>.</summary>
    internal static void AddExitCodes(this Command command, params (int Code, string Meaning)[] codes) =>
        CommandExitCodes.GetOrCreateValue(command).AddRange(codes);

    /// <summary>The exit codes of a command: its own, then the shared ones it does not redefine.</summary>
    internal static IReadOnlyList<(int Code, string Meaning)> ExitCodesOf(Command command)
    {
        List<(int Code, string Meaning)> own = CommandExitCodes.TryGetValue(command, out var list) ? list : [];
        return [.. own.Concat(ExitCodes.Where(e => own.All(o => o.Code != e.Code))).OrderBy(e => e.Code)];
    }

    /// <summary>The help System.CommandLine writes, followed by an "Exit codes:" section.</summary>
    private sealed class HelpWithExitCodes(SynchronousCommandLineAction help) : SynchronousCommandLineAction
    {
        public override int Invoke(ParseResult parseResult)
        {
            int result = help.Invoke(parseResult);
            TextWriter o = parseResult.InvocationConfiguration.Output;
            o.WriteLine("Exit codes:");
            foreach (var (code, meaning) in ExitCodesOf(parseResult.CommandResult.Command)) o.WriteLine($"  {code,-4} {meaning}");
            o.WriteLine();
            return result;
        }
    }

    internal static int Invoke(RootCommand root, string[] args)
    {
        ParseResult parsed = root.Parse(args);
        if (parsed.Errors.Count > 0 && parsed.Action is not HelpAction and not HelpWithExitCodes)
        {
            // The most specific message: an unknown word (in the parser's words) rather than "required command was
            // not provided"; on one line: the parser's messages may list choices on several lines. The parser's error
            // for an unknown word carries no type of its own, but the word itself is in UnmatchedTokens.
            string said = parsed.UnmatchedTokens is [string unknown, ..] ? $"Unrecognized command or argument '{unknown}'." : parsed.Errors[0].Message;
            string message = string.Join(' ', said.Split((char[])['\n', '\r', '\t'], StringSplitOptions.RemoveEmptyEntries).Select(p => p.Trim()));
            Console.Error.WriteLine($"vmsnap: {message}");
            return ExitUsage;
        }
        // Help, --version, the manual page: printed at once, nothing to clean up after a signal.
        if (parsed.Action is not AsynchronousCommandLineAction) return parsed.Invoke(new InvocationConfiguration { ProcessTerminationTimeout = null });
        // A command: vmsnap handles SIGINT/SIGTERM itself (System.CommandLine's handler exits 1 once
        // the command has cleaned up; shells expect 128 + the signal's number).
        using Termination termination = Termination.Install(TerminationGrace);
        return parsed.InvokeAsync(new InvocationConfiguration { ProcessTerminationTimeout = null }, termination.Token).GetAwaiter().GetResult();
    }

    /// <summary>
    /// How long a command may take to clean up after Ctrl-C or SIGTERM before the process ends anyway:
    /// long enough for a cancelled save to free what it wrote and flush (a cut cleanup is crash-safe,
    /// but may leak clusters).
    /// </summary>
    internal static readonly TimeSpan TerminationGrace = TimeSpan.FromSeconds(60);

    /// <summary>
    /// The --json option every command takes. <c>--output=json</c> (<see cref="OutputOption"/>) sets it
    /// too; <c>--json --output=human</c> is a usage error.
    /// </summary>
    internal static Option<bool> JsonOption()
    {
        var option = new Option<bool>("--json")
        {
            Description = "Print the result as JSON on stdout (same as --output=json)",
            DefaultValueFactory = result => OutputFormat(result) == "json",
        };
        option.Validators.Add(result =>
        {
            if (!result.Implicit && OutputFormat(result) == "human") result.AddError("--json and --output=human contradict each other");
        });
        return option;
    }

    /// <summary>The word given to --output, if any (read from the tokens: a wrong word is the option's own parse error).</summary>
    private static string? OutputFormat(SymbolResult result) =>
        result.GetResult(OutputOption) is { Tokens: [{ } token] } ? token.Value : null;

    /// <summary>
    /// Sets a command's action, turning vmsnap's errors into one line on stderr and a non-zero exit
    /// code, and a cancel by SIGINT/SIGTERM into 130/143. The action runs on the calling thread, to
    /// completion: vmsnap's own handler (<see cref="Termination"/>, installed before the action starts)
    /// cancels the token from the signal thread.
    /// </summary>
    internal static void SetHandler(this Command command, Func<ParseResult, CancellationToken, int> action)
    {
        command.SetAction((parseResult, cancellationToken) => Task.FromResult(Run(action, parseResult, cancellationToken)));
    }

    private static int Run(Func<ParseResult, CancellationToken, int> action, ParseResult parseResult, CancellationToken cancellationToken)
    {
        try
        {
            return action(parseResult, cancellationToken);
        }
        catch (Exception e) when (e is VmsnapException or IOException or UnauthorizedAccessException or OperationCanceledException or ArgumentException or FormatException)
        {
            if (e is OperationCanceledException && Termination.Current is { SignalExitCode: int code } t)
            {
                Console.Error.WriteLine($"vmsnap: cancelled by {t.SignalName}");
                return code;
            }
            string message = e is OperationCanceledException ? "cancelled" : e.Message.ReplaceLineEndings(" ") + Hint(e);
            Console.Error.WriteLine($"vmsnap: {message}");
            return ExitFailure;
        }
    }

    /// <summary>What to do about an error, in the command line's words, when its type and properties say: an image to repair first, a domain to stop.</summary>
    private static string Hint(Exception e)
    {
        for (Exception? cause = e; cause is not null; cause = cause.InnerException)
            if (cause is Qcow2FormatException { RepairNeeded: true }) return " (run 'vmsnap check --repair all')";
            else if (cause is DomainNotShutOffException) return " (loadvm --force stops it at once)";
        return "";
    }

    /// <summary>Prints <paramref name="value"/> as qemu-img-style JSON, with the generated serialiser <paramref name="type"/> (of <see cref="CliJson"/> or <see cref="CliJsonWithNulls"/>).</summary>
    internal static void WriteJson<T>(T value, JsonTypeInfo<T> type) =>
        Console.Out.WriteLine(JsonSerializer.Serialize(value, type));

    /// <summary>
    /// Where a file that replaces <paramref name="target"/> is written first: a hidden, uniquely named file in
    /// the same folder (<c>.NAME.vmsnap-GUID.tmp</c>), renamed over the target once complete (an atomic rename).
    /// </summary>
    internal static string ScratchPathBeside(string target)
    {
        string full = Path.GetFullPath(target);
        return Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.vmsnap-{Guid.NewGuid():N}.tmp");
    }

    /// <summary>Parses a size like qemu-img does: bytes, or a number with k/K, M, G, T (powers of 1024), optionally followed by B.</summary>
    internal static long ParseSize(string text)
    {
        string s = text.Trim();
        if (s.EndsWith('B') || s.EndsWith('b')) s = s[..^1];
        long multiplier = 1;
        if (s.Length > 0 && char.IsLetter(s[^1]))
        {
            multiplier = char.ToUpperInvariant(s[^1]) switch
            {
                'K' => 1L << 10,
                'M' => 1L << 20,
                'G' => 1L << 30,
                'T' => 1L << 40,
                'P' => 1L << 50,
                _ => throw new FormatException($"invalid size '{text}': unknown suffix '{s[^1]}'"),
            };
            s = s[..^1];
        }
        if (!decimal.TryParse(s, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out decimal number) || number < 0)
            throw new FormatException($"invalid size '{text}'");
        if (number > long.MaxValue / multiplier || number * multiplier != decimal.Truncate(number * multiplier))
            throw new FormatException($"invalid size '{text}': not a whole number of bytes within range");
        return (long)(number * multiplier);
    }

    /// <summary><see cref="ParseSize"/> for sizes that must fit in 32 bits (cluster and buffer sizes).</summary>
    internal static int ParseInt32Size(string text)
    {
        long bytes = ParseSize(text);
        if (bytes > int.MaxValue) throw new FormatException($"invalid size '{text}': at most {int.MaxValue} bytes");
        return (int)bytes;
    }

    /// <summary>Formats a byte count the way qemu-img does (e.g. "64 MiB").</summary>
    internal static string FormatSize(long bytes)
    {
        string[] units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        double v = bytes;
        int u = 0;
        while (v >= 1024 && u < units.Length - 1) { v /= 1024; u++; }
        if (u == 0) return $"{bytes} B";
        return v >= 100 || v == Math.Floor(v) ? $"{v:0.###} {units[u]}" : $"{v:0.##} {units[u]}";
    }
}

/// <summary>A top-level command by its name, and how to build it (only when it is needed: see <see cref="Cli.Root"/>).</summary>
internal sealed record CommandFactory(string Name, Func<Command> Create);
